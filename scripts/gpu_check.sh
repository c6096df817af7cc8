#!/usr/bin/env bash
# The checks that need a GPU, in under 8 minutes on one: bf16 and gradient accumulation on CUDA, a short bf16-mixed
# `elo run` on a random-weight Llama-3.2-1B shape, and `elo bench` of an 8B shape (elo against fft). JSON out.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: runs/gpu-check
#
# Needs elo-cpt set up with a CUDA build of torch (`bash setup.sh` on a Linux GPU machine) and the default
# assets (setup.sh prepares them). It has NEVER RUN: no session so far had a GPU (docs/training.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

# 1. bf16 updates and gradient accumulation, with Trainer on CUDA (one GPU: the two-process tests are left out)
timeout 240 "$PY" -m pytest tests/test_precision.py -q -m "not slow" -k "not two_processes and not killing" \
    --junitxml "$OUT/precision.xml" 2>&1 | tee "$OUT/precision.log"
precision_rc=${PIPESTATUS[0]}

# 2. a short bf16-mixed `elo run` on a random-weight 1B Llama shape with SmolLM2's tokenizer
"$PY" - "$OUT/llama-1b" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from elo_cpt.demo.assets import prepare_assets
from elo_cpt.benchmark import load_config
config = load_config("llama-3.2-1b")
tokenizer = AutoTokenizer.from_pretrained(prepare_assets().model)
config.vocab_size = len(tokenizer)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF
start=$(date +%s)
timeout 240 .venv/bin/elo run "model=$OUT/llama-1b" stage1.tokens=65536 align.tokens=16384 seq_len=512 \
    stage1.precision=bf16-mixed align.precision=bf16-mixed stage1.batch_size=8 align.batch_size=8 \
    eval.max_chars=20000 eval.sample_tokens=0 --out "$OUT/run" 2>&1 | tee "$OUT/run.log"
run_rc=${PIPESTATUS[0]}
run_seconds=$(( $(date +%s) - start ))

# 3. tokens/s and peak memory of an 8B shape, ELO stage 1 against full fine-tuning, bf16-mixed
timeout 240 .venv/bin/elo bench llama-3.1-8b --methods elo,fft --precision bf16-mixed --batch-size 1 --seq-len 2048 \
    --steps 3 --json "$OUT/bench-8b.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

"$PY" - "$OUT" "$precision_rc" "$run_rc" "$run_seconds" "$bench_rc" <<'EOF'
import json, sys
from pathlib import Path
out, precision_rc, run_rc, run_seconds, bench_rc = Path(sys.argv[1]), *map(int, sys.argv[2:])
import torch
summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "precision_tests_rc": precision_rc, "run_rc": run_rc, "run_seconds": run_seconds, "bench_rc": bench_rc}
metrics = out / "run" / "metrics.json"
if metrics.is_file():
    m = json.loads(metrics.read_text())
    summary["run"] = {"eval": m["eval"], "stages": {k: {"seconds": v["seconds"], **{f: v.get("training", {}).get(f)
                      for f in ("tokens", "precision", "final_loss")}} for k, v in m["stages"].items()}}
bench = out / "bench-8b.json"
if bench.is_file():
    b = json.loads(bench.read_text())
    summary["bench_8b"] = {k: {f: v.get(f) for f in ("tokens_per_s", "peak_memory_bytes", "measured_speedup_vs_fft",
                                                      "bound_speedup_vs_fft")} for k, v in b["methods"].items()}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(1 if precision_rc or run_rc or bench_rc else 0)
EOF
