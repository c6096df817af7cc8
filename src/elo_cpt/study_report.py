"""The results of an `elo study`: Markdown tables per group of cells and one plot. A leaf module (plain dicts in)."""

from __future__ import annotations

import os
import platform
import time
from importlib import resources
from pathlib import Path

import jinja2

from elo_cpt import files

METHOD_LABELS = {"base": "base model", "elo": "ELO", "control": "alignment only", "fft": "full fine-tuning",
                 "lora": "LoRA", "freeze": "freeze-tuning"}


def machine() -> dict:
    """What a measurement ran on: CPUs, platform, torch version and threads, the GPU if any, and when."""
    import torch

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _base_eval(cells: list[dict]) -> dict:
    for cell in cells:
        if cell.get("method") == "base" and not cell.get("missing"):
            return cell["eval"]["final"]
    return {}


def _elo_flops(cells: list[dict], name: str) -> float | None:
    for cell in cells:
        if cell["name"] == name and not cell.get("missing"):
            return cell["flops"]
    return None


def _bpc(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if base is None:
        return f"{value:.4f}"
    change = 100 * (value - base) / base
    return f"{value:.4f} ({change:+.1f}%)"


def rows(results: dict) -> list[tuple[str, list[list[str]]]]:
    """Table rows per group, in the order the groups first appear."""
    cells = results["cells"]
    target = results["target_language"]
    base = _base_eval(cells)
    reference_flops = _elo_flops(cells, "elo")
    groups: dict[str, list[list[str]]] = {}
    for cell in cells:
        group = groups.setdefault(cell.get("group") or "", [])
        method = METHOD_LABELS.get(cell["method"], cell["method"])
        if cell.get("missing"):
            group.append([cell["name"], method, *["not run yet"] + ["-"] * 8])
            continue
        if cell.get("budget"):
            method += f", equal {'FLOPs' if cell['budget'] == 'flops' else 'tokens'}"
        final, merged = cell["eval"].get("final", {}), cell["eval"].get("merged", {})
        flops = cell["flops"]
        relative = f" ({flops / reference_flops:.2f}x)" if reference_flops and flops else ""
        group.append([
            cell["name"], method, f"{cell['tokens']:,}", f"{cell['characters']:,}" if "characters" in cell else "-",
            f"{flops / 1e12:.1f}{relative}" if flops else "0",
            f"{cell['train_seconds']:.0f}" + (f" ({cell['resumes']} resumed)" if cell.get("resumes") else ""),
            f"{cell['peak_rss_bytes'] / 2**30:.2f}" if cell.get("peak_rss_bytes") else "-",
            _bpc(final.get(target), base.get(target)), _bpc(final.get("en"), base.get("en")),
            _bpc(merged.get(target), base.get(target)) if merged else "", cell.get("note", ""),
        ])
    return list(groups.items())


def markdown(results: dict) -> str:
    """results.md, from the package's template (templates/study.md.j2), as the run report is written."""
    target = results["target_language"]
    header = ["cell", "method", "training tokens", "training chars", "TFLOPs (x ELO)", "train s", "peak RSS GiB",
              f"{target} bits/char (vs base)", "en bits/char (vs base)", f"{target} before alignment", "note"]
    environment = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["cell"] = lambda cell: str(cell).replace("|", "\\|")  # notes may hold |
    template = resources.files("elo_cpt").joinpath("templates", "study.md.j2").read_text(encoding="utf-8")
    machine = {"gpu": None, **results["machine"]}
    return environment.from_string(template).render(model=results["model"], target=target, m=machine, header=header,
                                                      groups=rows(results))


def plot(results: dict, path: Path) -> None:
    """Target and English bits/char of every finished cell against its training FLOPs."""
    # A bare Figure on its own Agg canvas, not pyplot: the calling process keeps its backend and its figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in results["cells"] if not c.get("missing")]
    target = results["target_language"]
    figure = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    base = _base_eval(cells)
    markers = {"base": "s", "elo": "o", "control": "^", "fft": "D", "lora": "v", "freeze": "P"}
    colours = {"base": "tab:grey", "elo": "tab:red", "control": "tab:green", "fft": "tab:blue", "lora": "tab:purple",
               "freeze": "tab:brown"}
    for ax, lang in zip(axes, (target, "en")):
        for cell in cells:
            value = cell["eval"].get("final", {}).get(lang)
            if value is None:
                continue
            x = cell["flops"] / 1e12
            ax.scatter(x, value, marker=markers.get(cell["method"], "o"), color=colours.get(cell["method"], "black"),
                       label=METHOD_LABELS.get(cell["method"]))
            ax.annotate(cell["name"], (x, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if lang in base:
            ax.axhline(base[lang], color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="training TFLOPs (cost model)", ylabel=f"{lang} bits/char (lower is better)", title=f"{lang} held-out text")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=8)
    figure.tight_layout()
    with files.replacing(path) as tmp:
        figure.savefig(tmp, format="png")


def write(out: Path, results: dict) -> None:
    files.write_text(out / "results.md", markdown(results))
    plot(results, out / "results.png")
