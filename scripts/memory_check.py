"""The cost model's memory estimate against measured peaks: `elo bench` on small named shapes (random weights), on
this machine's CPU, in fp32; each method's estimate next to its peak net of the runtime (VmHWM minus the VmRSS before
the model was built), and the error.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/memory_check.py [OUT_DIR] [SHAPE ...]   # default: three shapes, ~15 min on 2 busy cores

Writes each shape's `elo bench` JSON to OUT_DIR (default runs/memory-check) and prints one table (docs/benchmarks.md).
"""

import sys
from pathlib import Path

from elo_cpt import benchmark

#: (shape, methods, the align row's optimizer, its activation checkpointing, its step_in_backward)
ROWS = [("smollm2-135m", "elo,align,fft", None, False, False), ("smollm2-360m", "elo,align,fft", None, False, False),
        ("qwen2.5-0.5b", "elo,fft", None, False, False), ("smollm2-135m", "align", "adafactor", False, False),
        ("smollm2-135m", "align", "galore", False, False), ("smollm2-135m", "align", "adamw_8bit", False, False),
        ("smollm2-135m", "align", None, True, False), ("smollm2-135m", "align", "adafactor", False, True),
        ("smollm2-135m", "align", "adafactor", True, True)]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/memory-check")
    shapes = set(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| shape | method | optimizer | estimated (MiB) | measured, net of runtime (MiB) | error |", "|---|---|---|---|---|---|"]
    for shape, methods, optimizer, checkpointing, in_backward in ROWS:
        if shapes and shape not in shapes:
            continue
        name = (f"{shape}-{methods.replace(',', '-')}{'-' + optimizer if optimizer else ''}{'-ckpt' if checkpointing else ''}"
                f"{'-sib' if in_backward else ''}")
        result = benchmark.bench(shape, methods, batch=2, seq=128, steps=1, warmup=1, precision="32-true",
                                 json_path=out / f"{name}.json", align_method=optimizer, align_checkpointing=checkpointing,
                                 align_step_in_backward=in_backward)
        for method, row in result["methods"].items():
            estimate, measured = row["estimated_memory_bytes"], row["net_peak_bytes"]
            optimizer_used = (row.get("optimizer", "adamw") + (" + checkpointing" if row.get("gradient_checkpointing") else "")
                              + (" + step in backward" if row.get("step_in_backward") else ""))
            lines.append(f"| {shape} | {method} | {optimizer_used} | {estimate / 2**20:,.0f} | "
                         f"{measured / 2**20:,.0f} | {(estimate - measured) / measured:+.1%} |")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
