"""The run report: what the adaptation bought (target language) and what it cost (English, time), from metrics.json.

`summary()` is the plain-text table printed at the end of `elo run`; `write_report()` writes OUT/report.html (one
self-contained page, plots inline) and OUT/report.md (plots in OUT/report_files/). Models and sections that are
not built in are picked up from metrics.json as they appear: any extra model under `eval` (e.g. a baseline
"baseline_fft") gets a bar, a table row and a comparison with the final model; a `baselines` section gets rows in
the cost table and its own loss curves.

The figures are drawn in report_figures.py and the page templates are package data (templates/report.*.j2).

A leaf module: it reads the metrics dictionary the pipeline writes, and imports nothing else of elo_cpt but errors,
files, findings, report_chat (the chat section) and report_figures.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import jinja2
import yaml

from elo_cpt.errors import EloError
from elo_cpt.files import write_bytes, write_text
from elo_cpt.findings import (LANGUAGES, STAGE_LABELS, chat_forgetting, environment_line, explanations, forgetting, label,
                               language, references, resumes, tolerance_pct, training_records, training_rows)
from elo_cpt.report_chat import chat_cards, chat_content, chat_summary
from elo_cpt.report_figures import plot_bits_per_char, plot_cost, plot_losses

HTML_FILE, MD_FILE, FILES_DIR = "report.html", "report.md", "report_files"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(metrics: dict) -> str:
    """The tables printed at the end of `elo run`."""
    evaluation = metrics["eval"]
    languages = list(next(iter(evaluation.values())).keys())
    rows = [
        [label(name)] + [f"{result[lang]['bits_per_char']:.4f}" for lang in languages]
        for name, result in evaluation.items()
    ]
    base = evaluation.get("base")
    if base and "final" in evaluation:
        rows.append(
            ["change, final vs base"]
            + [f"{evaluation['final'][lang]['bits_per_char'] - base[lang]['bits_per_char']:+.4f}" for lang in languages]
        )
    quality = _table(["model (bits/char, lower is better)"] + languages, rows)
    steps = cost_table(metrics)
    cost = _table(steps["header"], [[cell["text"] for cell in row["cells"]] for row in steps["rows"]
                                    if row["cells"][0]["cls"] != "strong"])  # the total has its own line
    chat_rows = chat_summary(metrics)
    chat = f"\n\n{_table(chat_rows[0], chat_rows[1:])}" if chat_rows else ""
    warnings = [f"\nwarning: {row['message']}" for row in [*forgetting(metrics), *chat_forgetting(metrics)] if row["flag"]]
    notes = "".join(f"\nnote: {note}" for note in explanations(metrics))
    return f"{quality}\n{notes}{chat}\n\n{cost}\n\n{total_line(metrics)}" + "".join(warnings)


def total_line(metrics: dict) -> str:
    """The run's total time over every invocation, and which stages were resumed."""
    resumed = resumes(metrics)
    if not resumed:
        return f"total {metrics['total_seconds']:.0f} s"
    which = ", ".join(f"{name} {n}x" for name, n in resumed.items())
    this = f"; this invocation {metrics['this_invocation_seconds']:.0f} s" if "this_invocation_seconds" in metrics else ""
    return f"total {metrics['total_seconds']:.0f} s over every invocation (resumed: {which}{this})"


# ---------------------------------------------------------------------------------------------- the content


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)" if seconds >= 120 else f"{seconds:.1f} s"


def _cell(text: str, cls: str = "") -> dict:
    return {"text": text, "cls": cls}


def headline(metrics: dict) -> list[dict]:
    """The few numbers a reader needs first: target-language gain, English change, time."""
    evaluation = metrics.get("eval", {})
    target = metrics.get("config", {}).get("target_language")
    items = []
    changes = {(r["language"], r["reference"]): r for r in forgetting(metrics)}
    name = LANGUAGES.get(target, target)
    cards = [(target, "base", f"{name} (target language)")]
    replay = metrics.get("config", {}).get("data", {}).get("replay_language", "en")
    if target != replay:
        cards.append((replay, "base", f"{LANGUAGES.get(replay, replay)} (forgetting check)"))
    cards += [(target, r, f"{name}: final vs {label(r)}") for r in references(metrics) if r != "base"]
    for lang, reference, title in cards:
        row = changes.get((lang, reference))
        if row is None:
            continue
        worse = row["flag"] or (lang == target and row["change"] > 0)
        items.append({
            "title": title,
            "value": f"{row['change_pct']:+.1f}% bits/char",
            "detail": f"{row['before']:.4f} → {row['after']:.4f} ({label(reference)} → final)",
            "status": "bad" if worse else "good" if row["change"] < 0 else "neutral",
        })
    items += chat_cards(metrics)
    if "total_seconds" in metrics:
        trained = sum((stage.get("training") or {}).get("tokens", 0) for stage in metrics.get("stages", {}).values())
        resumed = sum(resumes(metrics).values())
        detail = [f"{trained:,} tokens trained"] if trained else []
        detail += [f"{resumed} resume{'s' if resumed > 1 else ''}, every invocation counted"] if resumed else []
        items.append({
            "title": "total time",
            "value": _fmt_seconds(metrics["total_seconds"]),
            "detail": "; ".join(detail),
            "status": "neutral",
        })
    trained_stages = [(name, stage["training"]) for name, stage in metrics.get("stages", {}).items()
                      if (stage.get("training") or {}).get("precision")]
    if trained_stages:
        precisions = dict.fromkeys(t["precision"] for _, t in trained_stages)
        machine = trained_stages[0][1].get("hardware", {})
        items.append({
            "title": "precision and hardware",
            "value": " / ".join(precisions) if len(precisions) > 1 else next(iter(precisions)),
            "detail": f"{machine.get('gpu') or machine.get('device', '?')}, torch {machine.get('torch', '?')}",
            "status": "neutral",
        })
    if not evaluation:
        items.append({"title": "evaluation", "value": "none", "detail": "metrics.json has no eval results", "status": "bad"})
    return items


def quality_table(evaluation: dict) -> dict:
    languages = list(dict.fromkeys(lang for result in evaluation.values() for lang in result))
    header = ["model"] + [f"{lang} {unit}" for lang in languages for unit in ("bits/char", "bits/byte")]
    best = {lang: min((r[lang]["bits_per_char"] for r in evaluation.values() if lang in r), default=None) for lang in languages}
    rows = []
    for name, result in evaluation.items():
        cells = [_cell(label(name))]
        for lang in languages:
            value = result.get(lang)
            if value is None:
                cells += [_cell("–"), _cell("–")]
                continue
            cls = "best" if value["bits_per_char"] == best[lang] and len(evaluation) > 1 else ""
            cells += [_cell(f"{value['bits_per_char']:.4f}", cls), _cell(f"{value['bits_per_byte']:.4f}")]
        rows.append({"cells": cells, "flag": False})
    return {"header": header, "rows": rows}


def forgetting_table(metrics: dict) -> dict:
    header = ["language", "final vs", "before (bits/char)", "final (bits/char)", "change (bits/char)", "change %", "verdict"]
    rows = []
    for r in forgetting(metrics):
        verdict = "⚠ worse than tolerance" if r["flag"] else r["verdict"]
        rows.append({"cells": [_cell(language(r["language"])), _cell(label(r["reference"])), _cell(f"{r['before']:.4f}"),
                               _cell(f"{r['after']:.4f}"), _cell(f"{r['change']:+.4f}"), _cell(f"{r['change_pct']:+.2f}%"),
                               _cell(verdict, "bad" if r["flag"] else "good" if r["change"] < 0 else "")],
                     "flag": r["flag"]})
    return {"header": header, "rows": rows}


def cost_table(metrics: dict) -> dict:
    header = ["step", "model trained", "seconds", "tokens", "tokens/s", "trainable params", "last loss (nats/token)",
              "peak memory (RSS)", "resumes"]
    rows = []
    for row in training_rows(metrics):
        seconds, t = row["seconds"], row["training"]
        rate = t["tokens"] / t["seconds"] if t.get("tokens") and t.get("seconds") else None
        rss = t.get("peak_rss_bytes")
        loss = t.get("final_loss")
        rows.append({"cells": [_cell(row["label"]), _cell(row["model"]), _cell(f"{seconds:.1f}" if seconds is not None else ""),
                               _cell(f"{t['tokens']:,}" if t.get("tokens") else ""), _cell(f"{rate:,.0f}" if rate else ""),
                               _cell(f"{t['trainable_params']:,}" if t.get("trainable_params") else ""),
                               _cell(f"{loss:.4f}" if isinstance(loss, (int, float)) else ""),
                               _cell(f"{rss / 2**30:.2f} GiB" if rss else ""),
                               _cell(str(t["resumes"]) if "resumes" in t else "")], "flag": False})
    if "total_seconds" in metrics:
        rows.append({"cells": [_cell("total (this run)", "strong"), _cell(""), _cell(f"{metrics['total_seconds']:.1f}", "strong")]
                     + [_cell("")] * 6, "flag": False})
    return {"header": header, "rows": rows}


def data_table(metrics: dict) -> dict | None:
    data = metrics.get("data") or {}
    parts = {name: part for name, part in data.items() if isinstance(part, dict) and "tokens" in part}
    if not parts:
        return None
    languages = list(dict.fromkeys(lang for part in parts.values() for lang in part.get("byte_share", {})))
    header = ["mixture", "documents", "tokens"] + [f"{lang} share of bytes" for lang in languages]
    rows = [{"cells": [_cell(STAGE_LABELS.get(name, name)), _cell(f"{part.get('documents', 0):,}"), _cell(f"{part['tokens']:,}")]
             + [_cell(f"{100 * part.get('byte_share', {}).get(lang, 0):.1f}%") for lang in languages], "flag": False}
            for name, part in parts.items()]
    return {"header": header, "rows": rows}


def _metric_text(task: dict, metric: str) -> str:
    value = task.get("metrics", {}).get(metric)
    if value is None:
        return "–"
    stderr = task.get("stderr", {}).get(metric)
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else f"{value:.4f}"


def lm_eval_tables(metrics: dict) -> tuple[dict | None, dict | None]:
    """The requested tasks (main table) and every task and subtask lm-eval scored (full table), models as columns."""
    results = metrics.get("lm_eval") or {}
    if not results:
        return None, None
    models = list(results)
    every = list(dict.fromkeys(task for result in results.values() for task in result))
    requested = [t for t in metrics.get("config", {}).get("eval", {}).get("tasks", []) if t in every] or every

    def table(tasks: list[str]) -> dict:
        header = ["task", "metric"] + [label(m) for m in models]
        if "base" in models and "final" in models:
            header.append("final − base")
        rows = []
        for task in tasks:
            scored = [results[m].get(task, {}) for m in models]
            names = list(dict.fromkeys(k for s in scored for k in s.get("metrics", {})))
            for metric in names:
                cells = [_cell(task), _cell(metric)] + [_cell(_metric_text(s, metric)) for s in scored]
                if "base" in models and "final" in models:
                    before = results["base"].get(task, {}).get("metrics", {}).get(metric)
                    after = results["final"].get(task, {}).get("metrics", {}).get(metric)
                    higher = results["final"].get(task, {}).get("higher_is_better", {}).get(metric, True)
                    if before is None or after is None:
                        cells.append(_cell("–"))
                    else:
                        better = (after - before) * (1 if higher else -1)
                        cells.append(_cell(f"{after - before:+.4f}", "good" if better > 0 else "bad" if better < 0 else ""))
                rows.append({"cells": cells, "flag": False})
        return {"header": header, "rows": rows}

    full = table(every) if len(every) > len(requested) else None
    return table(requested), full


def sample_groups(metrics: dict) -> list[dict]:
    """Samples regrouped per language and prompt, with each model's completion."""
    samples = metrics.get("samples") or {}
    groups: dict[tuple[str, str], dict] = {}
    for model, per_lang in samples.items():
        for lang, items in per_lang.items():
            for item in items:
                group = groups.setdefault((lang, item["prompt"]), {"language": language(lang), "prompt": item["prompt"], "completions": []})
                group["completions"].append({"model": label(model), "text": item["completion"]})
    return list(groups.values())


def build_content(metrics: dict, run_dir: Path) -> dict:
    """Everything the HTML and Markdown pages show, with the figures as PNG bytes."""
    evaluation = metrics.get("eval") or {}
    records = training_records(metrics)
    figures = {}
    if evaluation:
        figures["bits_per_char"] = plot_bits_per_char(evaluation, label, language)
    for key, png in (("loss_curves", plot_losses(records)), ("time_and_tokens", plot_cost(records))):
        if png:
            figures[key] = png
    lm_main, lm_full = lm_eval_tables(metrics)
    config = metrics.get("config", {})
    return {
        "title": f"ELO run report: {run_dir.resolve().name}",
        "run_dir": str(run_dir.resolve()),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": config.get("model", "?"),
        "target": language(config.get("target_language", "?")),
        "layers": f"{config['layers']} -> {config['probed_layers']}" if config.get("probed_layers") else config.get("layers", "?"),
        "headline": headline(metrics),
        "warnings": [r["message"] for r in [*forgetting(metrics), *chat_forgetting(metrics)] if r["flag"]],
        "explanations": explanations(metrics),
        "environment": environment_line(metrics),
        "tolerance": tolerance_pct(metrics),
        "has_baselines": any(r != "base" for r in references(metrics)),
        "quality": quality_table(evaluation) if evaluation else None,
        "forgetting": forgetting_table(metrics),
        "cost": cost_table(metrics),
        "data": data_table(metrics),
        "lm_eval": lm_main,
        "lm_eval_full": lm_full,
        "samples": sample_groups(metrics),
        "chat": chat_content(metrics),
        "config_yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(),
        "figures": figures,
    }


# --------------------------------------------------------------------------------------------------- output


def _template(name: str) -> str:
    # Package data read through importlib.resources, so an installed wheel finds it as well as a source checkout.
    return resources.files("elo_cpt").joinpath("templates", name).read_text(encoding="utf-8")


def _md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, no raw HTML, newlines as <br>."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", "<br>").replace("*", "\\*")


def _md_table(t: dict) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t["header"]) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(t["header"]))) + "|"]
    for row in t["rows"]:
        cells = [_md_cell(c["text"]) for c in row["cells"]]
        lines.append("| " + " | ".join(f"**{c}**" if cell["cls"] in ("best", "strong") and c else c
                                         for c, cell in zip(cells, row["cells"])) + " |")
    return "\n".join(lines)


def load_metrics(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EloError(f"run folder {run_dir} does not exist; pass the --out folder of an `elo run`")
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise EloError(f"{run_dir} has no metrics.json; it is not a finished run, so finish it with `elo run ... --out {run_dir}`")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EloError(f"{path} is not valid JSON ({err}); rerun `elo run` into a fresh folder") from None
    if not isinstance(metrics, dict):
        raise EloError(f"{path} does not hold a metrics object; rerun `elo run` into a fresh folder")
    return metrics


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md (+ report_files/*.png); return their paths."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    content = build_content(metrics, run_dir)
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)
    images = {key: base64.b64encode(png).decode("ascii") for key, png in content["figures"].items()}
    page = environment.from_string(_template("report.html.j2")).render(c=content, images=images)

    figures_dir = run_dir / FILES_DIR
    figures_dir.mkdir(exist_ok=True)
    for key, png in content["figures"].items():
        write_bytes(figures_dir / f"{key}.png", png)
    for stale in figures_dir.glob("*.png"):
        if stale.stem not in content["figures"]:
            stale.unlink()
    markdown_env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    markdown_env.filters["md"] = _md_cell
    markdown_env.globals["table"] = _md_table
    markdown = markdown_env.from_string(_template("report.md.j2")).render(c=content, files=FILES_DIR)

    md_path, html_path = run_dir / MD_FILE, run_dir / HTML_FILE
    write_text(md_path, markdown)
    write_text(html_path, page)
    return html_path, md_path
