#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md on a GPU machine, in one go (budget: under 8 minutes on one H100/H200).
# Run from the repository root after `bash setup.sh` (PyPI's torch 2.13.0 wheel for Linux is a CUDA build;
# check with `.venv/bin/python -c "import torch; print(torch.cuda.is_available())"`).
# Results land in ${OUT:-bench-gpu}/ as JSON plus the printed tables.
set -euo pipefail
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
run() { timeout 150 .venv/bin/elo bench "$@" 2>&1 | grep -v "Loading weights" || echo "bench $1 failed or timed out"; }
run smollm2-135m --methods elo,freeze,lora,fft,align,elo-logits --batch 8 --seq 1024 --steps 5 --warmup 2 \
    --precision bf16-mixed --json "$OUT/smollm2.json" | tee "$OUT/smollm2.txt"
run llama-3.2-1b --methods elo,freeze,lora,fft,align --batch 4 --seq 2048 --steps 5 --warmup 2 \
    --precision bf16-mixed --json "$OUT/llama1b.json" | tee "$OUT/llama1b.txt"
run llama-3.1-8b --methods elo,elo-logits --batch 1 --seq 8192 --steps 3 --warmup 1 \
    --precision bf16-mixed --json "$OUT/llama8b.json" | tee "$OUT/llama8b.txt"
