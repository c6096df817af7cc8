"""Surgery at scale: detach and merge a multi-GB sharded checkpoint in bounded memory.

`elo detach` and `elo merge` run as child processes so that their own peak resident memory can be read. Print the
figures (they are quoted in docs/surgery.md) with:

    python -m pytest tests/test_surgery_scale.py -s -n 0 -m slow
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="reads peak memory from /proc")]

#: A Llama-shaped model of about 3 GB in bf16: 84 layers of 34 MB and untied 66 MB embedding and head, so that
#: the shallow model of two layers (~200 MB) is a small part of it, as in real use.
CONFIG = dict(model_type="llama", hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=16,
              vocab_size=32000, num_hidden_layers=84, tie_word_embeddings=False, dtype="bfloat16")
SPEC = "0,-1"
SHARD_BYTES = 700 << 20
MiB = 1 << 20


def write_checkpoint(path: Path, seed: int = 0) -> int:
    """Write a sharded bf16 checkpoint of random bytes with the real tensor names and shapes; return its size.

    The safetensors files are written here by hand, one tensor at a time, so that the test needs no memory for the
    model and does not rely on the code it tests.
    """
    config = AutoConfig.for_model(**CONFIG)
    config.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if shards[-1] and size + 2 * int(np.prod(shape)) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += 2 * int(np.prod(shape))
    # Each tensor is a slice of one random pool at a random start: distinct bytes for every tensor, so a misplaced
    # copy cannot pass, at the cost of generating 2 x the largest tensor rather than the whole checkpoint.
    rng = np.random.default_rng(seed)
    largest = max(2 * int(np.prod(shape)) for shape in shapes.values())
    pool = memoryview(rng.bytes(2 * largest))
    weight_map, total = {}, 0
    for number, names in enumerate(shards, 1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with (path / file_name).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name in names:
                start = int(rng.integers(0, largest))
                f.write(pool[start:start + header[name]["data_offsets"][1] - header[name]["data_offsets"][0]])
        total += offset
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


#: Runs the code given after it with `sys.argv` set to the arguments, then reports the process's peak memory.
#: VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child forked from this (big) pytest process
#: would report at least the parent's size; VmHWM belongs to the address space the child builds after exec.
_MEASURE = """
import sys
try:
    exec(sys.argv.pop(1))
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"elo-peak-kib {peak}", file=sys.stderr)
"""


def run_measured(code: str, *args: str) -> tuple[float, int]:
    """Run Python `code` in a child with `args` as sys.argv[1:]; return its wall time and peak resident memory in bytes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, code, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    return seconds, 1024 * int(re.search(r"^elo-peak-kib (\d+)$", result.stderr, re.M).group(1))


def elo(*args: str) -> tuple[float, int]:
    return run_measured("from elo_cpt.cli import main; sys.exit(main(sys.argv[1:]))", *args)


def shard_tensors(folder: Path):
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                yield shard.name, name, f


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Random bytes make NaNs, which torch.equal never calls equal: compare the bits.
    return tensor.reshape(-1).view(torch.uint8)


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    # 6 GB: not left to pytest, which keeps the folders of the last three runs.
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_detach_and_merge_of_a_3gb_checkpoint_stay_far_below_its_size(workdir):
    base, shallow, merged = workdir / "base", workdir / "shallow", workdir / "merged"
    base.mkdir()
    start = time.perf_counter()
    checkpoint_bytes = write_checkpoint(base)
    write_seconds = time.perf_counter() - start
    n = CONFIG["num_hidden_layers"]

    _, import_rss = run_measured("from elo_cpt import cli, surgery; from transformers import LlamaForCausalLM")
    detach_seconds, detach_rss = elo("detach", str(base), "--layers", SPEC, "--out", str(shallow))
    shallow_bytes = sum(f.stat().st_size for f in shallow.glob("*.safetensors"))

    # Stand-in for training: new values for every tensor of the two kept layers, saved in fp32 as training does.
    trained = load_file(shallow / "model.safetensors")
    rng = np.random.default_rng(1)
    for name in [k for k in trained if k.startswith("model.layers.")]:
        trained[name] = torch.from_numpy(rng.standard_normal(trained[name].shape, dtype=np.float32))
    save_file(trained, shallow / "model.safetensors", metadata={"format": "pt"})
    merge_seconds, merge_rss = elo("merge", str(base), str(shallow), "--out", str(merged))

    print(
        f"\ncheckpoint {checkpoint_bytes / MiB:,.0f} MiB ({checkpoint_bytes / 1e9:.2f} GB) in {len(list(base.glob('*.safetensors')))} shards (written in {write_seconds:.1f} s); "
        f"shallow model {shallow_bytes / MiB:,.0f} MiB\n"
        f"python + torch + transformers imports: peak RSS {import_rss / MiB:,.0f} MiB\n"
        f"elo detach --layers {SPEC}: peak RSS {detach_rss / MiB:,.0f} MiB ({detach_rss / checkpoint_bytes:.0%} of the checkpoint), {detach_seconds:.1f} s\n"
        f"elo merge: peak RSS {merge_rss / MiB:,.0f} MiB ({merge_rss / checkpoint_bytes:.0%} of the checkpoint), {merge_seconds:.1f} s"
    )
    assert checkpoint_bytes > 2.9e9
    # Loading the base model would take 100 %; reading only the kept tensors costs about the shallow model once.
    assert detach_rss < 0.40 * checkpoint_bytes
    assert detach_rss - import_rss < 2 * shallow_bytes
    # Streaming: a tensor or two besides the imports (the largest read here is a 16 MB fp32 layer weight), not a
    # 700 MB shard.
    assert merge_rss < 0.40 * checkpoint_bytes
    assert merge_rss - import_rss < 128 * MiB

    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (merged / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    assert (merged / "tokenizer.json").is_file() and (merged / "config.json").is_file()
    kept = {0: 0, n - 1: 1}
    changed = 0
    with safe_open(shallow / "model.safetensors", "pt") as new:
        for shard, name, after in shard_tensors(merged):
            with safe_open(base / shard, "pt") as before:
                original = before.get_tensor(name)
            written = after.get_tensor(name)
            parts = name.split(".")
            if name.startswith("model.layers.") and int(parts[2]) in kept:
                expected = new.get_tensor(".".join([*parts[:2], str(kept[int(parts[2])]), *parts[3:]])).to(original.dtype)
                assert not torch.equal(as_bytes(written), as_bytes(original))
                changed += 1
            else:
                expected = original
            assert written.dtype == original.dtype and written.shape == original.shape
            assert torch.equal(as_bytes(written), as_bytes(expected)), name
    assert changed == 2 * 9  # 7 linear weights and 2 norms per Llama layer
    assert sum(1 for _ in shard_tensors(merged)) == sum(1 for _ in shard_tensors(base))
