"""The run report's figures, drawn as PNG bytes so the HTML page can inline them and the Markdown page can link them.

A leaf module: plain dicts and lists in, bytes out. It imports nothing of elo_cpt; the report passes in its naming
functions (`label`, `language`) so the figures and the tables name models and languages the same way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

_COLOURS = {"base": "#9aa0a6", "merged": "#7fb3e0", "final": "#1a5fb4", "control": "#e5a50a"}
_EXTRA_COLOURS = ["#e66100", "#2ca02c", "#9141ac", "#c01c28", "#986a44", "#5e5c64"]


def _colour(name: str, order: list[str]) -> str:
    if name in _COLOURS:
        return _COLOURS[name]
    extras = [n for n in order if n not in _COLOURS]
    return _EXTRA_COLOURS[extras.index(name) % len(_EXTRA_COLOURS)]


def _png(figure: Figure) -> bytes:
    # A bare Figure on its own Agg canvas rather than pyplot: no global figure state, and no GUI backend whatever
    # backend the calling process has selected.
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_bits_per_char(evaluation: dict, label: Callable[[str], str], language: Callable[[str], str]) -> bytes:
    """Grouped bars of bits/char per language (groups) per model (bars), and beside them each model's change against
    the base in percent: the absolute bars start at zero, where a 5% difference is hard to see, so the change gets
    its own panel (also starting at zero, rather than an axis cut to exaggerate it)."""
    models = list(evaluation)
    languages = list(dict.fromkeys(lang for result in evaluation.values() for lang in result))
    compared = [name for name in models if name != "base"] if "base" in evaluation else []
    figure = Figure(figsize=(12 if compared else 8, 3.8))
    axes = figure.add_subplot(1, 2 if compared else 1, 1)
    _grouped_bars(axes, models, languages, lambda name, lang: evaluation[name].get(lang, {}).get("bits_per_char", math.nan),
                  label, "%.3f")
    axes.set_xticks(range(len(languages)), [language(lang) for lang in languages])
    axes.set(ylabel="bits per character (lower is better)", title="held-out text")
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(models), 3), frameon=False)
    if compared:
        axes = figure.add_subplot(1, 2, 2)

        def pct(name: str, lang: str) -> float:
            before = evaluation["base"].get(lang, {}).get("bits_per_char")
            after = evaluation[name].get(lang, {}).get("bits_per_char")
            return 100 * (after - before) / before if before and after is not None else math.nan

        _grouped_bars(axes, compared, languages, pct, label, "%+.1f%%", order=models)
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(range(len(languages)), [language(lang) for lang in languages])
        axes.set(ylabel="bits/char vs base, % (lower is better)", title="change against the base model")
    return _png(figure)


def _grouped_bars(axes, models: list[str], languages: list[str], value: Callable[[str, str], float],
                  label: Callable[[str], str], fmt: str, order: list[str] | None = None) -> None:
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(languages))]
        bars = axes.bar(xs, [value(name, lang) for lang in languages], width * 0.92, label=label(name),
                        color=_colour(name, order or models))
        axes.bar_label(bars, fmt=fmt, fontsize=7, padding=2)
    axes.margins(y=0.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)


def plot_losses(records: list[tuple[str, float | None, dict]]) -> bytes | None:
    """Training loss against optimizer step, one panel per stage that trained (their step scales differ), with the
    held-out loss per language where the stage logged it (`eval_steps`), dashed."""
    curves = [(name, training["losses"], training.get("eval_losses") or {}) for name, _, training in records
              if training.get("losses")]
    if not curves:
        return None
    columns = min(len(curves), 3)
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(3.6 * columns + 0.6, 3.0 * rows))
    for i, (name, losses, held_out) in enumerate(curves):
        axes = figure.add_subplot(rows, columns, i + 1)
        steps, values = [s for s, _ in losses], [v for _, v in losses]
        axes.plot(steps, values, color="#1a5fb4", marker="." if len(losses) < 30 else None, linewidth=1.2, label="training")
        for j, (lang, points) in enumerate(held_out.items()):
            axes.plot([s for s, _ in points], [v for _, v in points], linestyle="--", marker=".", linewidth=1.2,
                      color=_EXTRA_COLOURS[j % len(_EXTRA_COLOURS)], label=f"held-out {lang}")
        if held_out:
            axes.legend(fontsize=7)
        axes.set(title=name, xlabel="optimizer step", ylabel="loss (nats/token)" if i % columns == 0 else None)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return _png(figure)


def plot_cost(records: list[tuple[str, float | None, dict]]) -> bytes | None:
    """Seconds per step (left) and tokens trained per stage (right), as horizontal bars."""
    timed = [(name, seconds) for name, seconds, _ in records if seconds is not None]
    if not timed:
        return None
    trained = [(name, training["tokens"]) for name, _, training in records if training.get("tokens")]
    figure = Figure(figsize=(10, 0.45 * max(len(timed), 3) + 1.2))
    axes = figure.add_subplot(1, 2 if trained else 1, 1)
    bars = axes.barh([n for n, _ in timed], [s for _, s in timed], color="#1a5fb4")
    axes.bar_label(bars, fmt="%.1f s", fontsize=8, padding=3)
    axes.invert_yaxis()
    axes.margins(x=0.2)
    axes.set(xlabel="wall-clock seconds", title="time per step")
    axes.grid(axis="x", alpha=0.3)
    if trained:
        axes = figure.add_subplot(1, 2, 2)
        bars = axes.barh([n for n, _ in trained], [t for _, t in trained], color="#e66100")
        axes.xaxis.set_major_locator(MaxNLocator(4))
        axes.xaxis.set_major_formatter(EngFormatter(sep=""))
        axes.bar_label(bars, labels=[f"{t:,}" for _, t in trained], fontsize=8, padding=3)
        axes.invert_yaxis()
        axes.margins(x=0.25)
        axes.set(xlabel="tokens", title="tokens trained per stage")
        axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def plot_layer_probe(rows: list[dict], suggested: list[int], languages: list[str]) -> bytes:
    """`elo probe`'s figure: block influence and gradient norm per decoder layer (one line per language), with the
    suggested layers shaded."""
    figure = Figure(figsize=(9, 3.4))
    layers = [row["layer"] for row in rows]
    for column, (key, title) in enumerate((("block_influence", "block influence (1 - cos in/out)"),
                                           ("grad_norm", "gradient norm of the LM loss"))):
        axes = figure.add_subplot(1, 2, column + 1)
        for index, lang in enumerate(languages):
            axes.plot(layers, [row[key][lang] for row in rows], marker="o", markersize=3, label=lang,
                      color=_EXTRA_COLOURS[index % len(_EXTRA_COLOURS)] if index else "#1a5fb4")
        for layer in suggested:
            axes.axvspan(layer - 0.4, layer + 0.4, color="#e5a50a", alpha=0.25, lw=0)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("decoder layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _png(figure)
