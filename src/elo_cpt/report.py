"""The run summary: a plain-text table of bits/char per language per model, and time and tokens per stage.

A leaf module: it reads the metrics dictionary the pipeline writes to `metrics.json`, nothing else.
"""

from __future__ import annotations

MODEL_LABELS = {
    "base": "base model",
    "merged": "ELO stage 1, merged (before alignment)",
    "final": "ELO final (after alignment)",
}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(metrics: dict) -> str:
    """The tables printed at the end of `elo run`."""
    evaluation = metrics["eval"]
    languages = list(next(iter(evaluation.values())).keys())
    rows = [
        [MODEL_LABELS.get(name, name)] + [f"{result[lang]['bits_per_char']:.4f}" for lang in languages]
        for name, result in evaluation.items()
    ]
    base = evaluation.get("base")
    if base and "final" in evaluation:
        rows.append(
            ["change, final vs base"]
            + [f"{evaluation['final'][lang]['bits_per_char'] - base[lang]['bits_per_char']:+.4f}" for lang in languages]
        )
    quality = _table(["model (bits/char, lower is better)"] + languages, rows)
    stage_rows = []
    for name, stage in metrics["stages"].items():
        training = stage.get("training", {})
        stage_rows.append([
            name,
            f"{stage['seconds']:.1f}",
            f"{training['tokens']:,}" if training else "",
            f"{training['tokens'] / training['seconds']:.0f}" if training.get("seconds") else "",
            f"{training['trainable_params']:,}" if training else "",
        ])
    cost = _table(["step", "seconds", "tokens", "tokens/s", "trainable params"], stage_rows)
    return f"{quality}\n\n{cost}\n\ntotal {metrics['total_seconds']:.0f} s"
