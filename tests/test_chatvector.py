"""The chat vector on tiny model trios: exact arithmetic, scale, skip, dtypes, vocabulary sizes, refusals, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import VOCAB, make_tokenizer, save_tiny_model
from elo_cpt import chat_vector, checkpoint, cli
from elo_cpt.chatvector import PROVENANCE, vocabulary_tensors
from elo_cpt.errors import EloError


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in checkpoint.safetensors_files(model_dir) for name, tensor in load_file(shard).items()}


def trio(tmp_path: Path, arch: str, dtype: torch.dtype | None = None, target_dtype: torch.dtype | None = None,
         shard: str | None = None) -> tuple[Path, Path, Path]:
    """Base, instruct and target of one architecture with different random weights (seeds 0, 1, 2)."""
    paths = []
    for role, seed in (("base", 0), ("instruct", 1), ("target", 2)):
        path = save_tiny_model(tmp_path / role, arch, num_layers=2, seed=seed)
        wanted = target_dtype if role == "target" and target_dtype else dtype
        if wanted is not None or (role == "target" and shard):
            resave(path, dtype=wanted, shard=shard if role == "target" else None)
        paths.append(path)
    return paths[0], paths[1], paths[2]


def resave(path: Path, dtype: torch.dtype | None = None, shard: str | None = None, resize: int | None = None) -> None:
    """Rewrite a model folder in another dtype, in shards of `shard` bytes, or with `resize` vocabulary rows."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if resize:
        torch.manual_seed(3)
        model.resize_token_embeddings(resize, mean_resizing=False)
    shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    make_tokenizer().save_pretrained(path)


def expected(target: torch.Tensor, base: torch.Tensor, instruct: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (target.float() + scale * (instruct.float() - base.float())).to(target.dtype)


@pytest.mark.parametrize("arch, scale", [("llama", 1.0), ("mistral", 0.5), ("qwen2", -1.25)])
def test_exact_sum_per_tensor(tmp_path, arch, scale):
    base, instruct, target = trio(tmp_path, arch, shard="60KB" if arch == "mistral" else None)
    out = chat_vector(target, base, instruct, tmp_path / "out", scale=scale)
    b, i, t, o = weights(base), weights(instruct), weights(target), weights(out)
    assert set(o) == set(t)
    for name in t:
        assert o[name].dtype == torch.float32
        assert torch.equal(o[name], expected(t[name], b[name], i[name], scale)), name
    if arch == "mistral":  # TARGET's shards and index are kept
        assert len(checkpoint.safetensors_files(target)) > 1
        assert [p.name for p in checkpoint.safetensors_files(out)] == [p.name for p in checkpoint.safetensors_files(target)]
    assert ("lm_head.weight" in o) == (arch != "llama")  # llama's head is tied: no tensor of its own
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["scale"] == scale and provenance["skipped_tensors"] == [] and provenance["vocabulary"] == {}
    assert provenance["tied_embeddings"] == (arch == "llama")
    assert len({provenance[role]["digest"] for role in ("target", "base", "instruct")} | {provenance["output_digest"]}) == 4
    assert provenance["target"]["path"] == str(target.resolve())


def test_scale_zero_gives_target_and_digest_ignores_shards(tmp_path):
    base, instruct, target = trio(tmp_path, "mistral")
    sharded = tmp_path / "sharded"
    shutil.copytree(target, sharded)
    resave(sharded, shard="60KB")
    out = chat_vector(sharded, base, instruct, tmp_path / "out", scale=0.0)
    assert all(torch.equal(o, weights(target)[name]) for name, o in weights(out).items())
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["output_digest"] == provenance["target"]["digest"]
    again = chat_vector(target, base, instruct, tmp_path / "again", scale=0.0)  # the same weights, one file
    assert json.loads((again / PROVENANCE).read_text())["target"]["digest"] == provenance["target"]["digest"]


@pytest.mark.parametrize("arch, skip, kept", [
    ("mistral", "embeddings,head", {"model.embed_tokens.weight", "lm_head.weight"}),
    ("mistral", ["head"], {"lm_head.weight"}),
    ("llama", "head", {"model.embed_tokens.weight"}),  # tied: the shared tensor is the head too
])
def test_skip_keeps_targets_tensors(tmp_path, arch, skip, kept):
    base, instruct, target = trio(tmp_path, arch)
    out = chat_vector(target, base, instruct, tmp_path / "out", skip=skip)
    b, i, t, o = weights(base), weights(instruct), weights(target), weights(out)
    for name in t:
        assert torch.equal(o[name], t[name] if name in kept else expected(t[name], b[name], i[name])), name
    assert json.loads((out / PROVENANCE).read_text())["skipped_tensors"] == sorted(kept)


def test_unknown_skip_is_refused(tmp_path):
    base, instruct, target = trio(tmp_path, "llama")
    with pytest.raises(EloError, match="cannot skip 'norm'"):
        chat_vector(target, base, instruct, tmp_path / "out", skip="embeddings,norm")


@pytest.mark.parametrize("dtype, target_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32)])
def test_dtype_kept(tmp_path, dtype, target_dtype):
    """A bf16 trio stays bf16; a fp32 target (the embedded default) plus a bf16 vector stays fp32."""
    base, instruct, target = trio(tmp_path, "qwen2", dtype=dtype, target_dtype=target_dtype)
    out = chat_vector(target, base, instruct, tmp_path / "out")
    b, i, t, o = weights(base), weights(instruct), weights(target), weights(out)
    for name in t:
        assert b[name].dtype == dtype and o[name].dtype == (target_dtype or dtype)
        assert torch.equal(o[name], expected(t[name], b[name], i[name])), name
    assert AutoModelForCausalLM.from_pretrained(out).dtype == (target_dtype or dtype)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_larger_target_vocabulary_gets_the_vector_on_shared_rows(tmp_path, arch, capsys):
    base, instruct, target = trio(tmp_path, arch)
    resave(target, resize=VOCAB + 16)
    out = chat_vector(target, base, instruct, tmp_path / "out")
    b, i, t, o = weights(base), weights(instruct), weights(target), weights(out)
    vocab = ["model.embed_tokens.weight"] + (["lm_head.weight"] if arch == "mistral" else [])
    for name in t:
        if name in vocab:
            assert o[name].shape[0] == VOCAB + 16
            assert torch.equal(o[name][:VOCAB], expected(t[name][:VOCAB], b[name], i[name])), name
            assert torch.equal(o[name][VOCAB:], t[name][VOCAB:]), name
        else:
            assert torch.equal(o[name], expected(t[name], b[name], i[name])), name
    assert f"{VOCAB:,} shared rows" in capsys.readouterr().err
    recorded = json.loads((out / PROVENANCE).read_text())["vocabulary"]
    assert set(recorded) == set(vocab)
    assert recorded["model.embed_tokens.weight"] == {"target": VOCAB + 16, "base": VOCAB, "instruct": VOCAB, "rows_with_vector": VOCAB}
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == VOCAB + 16


@pytest.mark.parametrize("arch, embeddings, heads", [
    ("llama", ["model.embed_tokens.weight"], []),
    ("mistral", ["model.embed_tokens.weight"], ["lm_head.weight"]),
    ("gemma2", ["model.embed_tokens.weight"], []),
    ("gpt2", ["transformer.wte.weight"], []),
])
def test_vocabulary_tensors(tmp_path, arch, embeddings, heads):
    path = save_tiny_model(tmp_path / arch, arch, num_layers=1)
    assert vocabulary_tensors(path, set(checkpoint.tensor_locations(path))) == (embeddings, heads)


def test_gpt2_trio(tmp_path):
    base, instruct, target = trio(tmp_path, "gpt2")
    out = chat_vector(target, base, instruct, tmp_path / "out", skip="embeddings")
    b, i, t, o = weights(base), weights(instruct), weights(target), weights(out)
    for name in t:
        kept = name == "transformer.wte.weight" or not t[name].is_floating_point()
        assert torch.equal(o[name], t[name] if kept else expected(t[name], b[name], i[name])), name


def truncate(model_dir: Path, name: str, drop: bool = False) -> None:
    """Drop the last row of tensor `name` in a one-file model folder, or the whole tensor."""
    path = model_dir / checkpoint.SAFETENSORS_SINGLE
    tensors = load_file(path)
    if drop:
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, message", [
    ("shape", r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[64, 32\] in the target, \[63, 32\] in instruct"),
    ("layers", r"target \S+ has no tensor model\.layers\.2\.\S+, which base has"),
    ("head", r"base \S+ has no tensor lm_head\.weight, which the target has"),
    ("arch", r"different architectures \(target mistral, base qwen2, instruct mistral\)"),
])
def test_mismatch_refused_before_writing(tmp_path, case, message):
    base, instruct, target = trio(tmp_path, "mistral")
    if case == "shape":
        truncate(instruct, "model.layers.1.mlp.up_proj.weight")
    elif case == "head":
        truncate(base, "lm_head.weight", drop=True)
    else:
        shutil.rmtree(base)
        arch, layers = {"layers": ("mistral", 3), "arch": ("qwen2", 2)}[case]
        save_tiny_model(base, arch, num_layers=layers)
    out = tmp_path / "out"
    with pytest.raises(EloError, match=message) as err:
        chat_vector(target, base, instruct, out)
    assert "\n" not in str(err.value)
    assert not out.exists() and not checkpoint.staging_path(out).exists()


def test_cli_end_to_end(tmp_path, capsys):
    base, instruct, target = trio(tmp_path, "llama")
    out = tmp_path / "chat"
    argv = ["chat-vector", str(target), "--base", str(base), "--instruct", str(instruct), "--out", str(out), "--scale", "0.5"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Guten Tag", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    t, b, i = weights(target), weights(base), weights(instruct)
    state = model.state_dict()
    assert all(torch.equal(state[name], expected(t[name], b[name], i[name], 0.5)) for name in t)
    assert json.loads((out / PROVENANCE).read_text())["scale"] == 0.5
    capsys.readouterr()
    assert cli.main(argv) == 1  # the output exists: one line, nothing overwritten
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.main(argv[:-4] + ["--out", str(tmp_path / "other"), "--skip", "embeddings,head"]) == 0
    other = tmp_path / "other"
    assert json.loads((other / PROVENANCE).read_text())["skipped_tensors"] == ["model.embed_tokens.weight"]
    assert torch.equal(weights(other)["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


def test_hub_ids_from_the_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    from test_hub import COMMIT, cache_model

    base, instruct, target = trio(tmp_path, "llama")
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # so `org/...` is not a local path
    cache_model(cache, "org/base", base)
    cache_model(cache, "org/instruct", instruct)
    out = chat_vector(target, "org/base", f"org/instruct@{COMMIT}", tmp_path / "out")
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["base"]["model"] == "org/base" and provenance["base"]["hub"] == {"repo": "org/base", "commit": COMMIT}
    assert provenance["instruct"]["hub"]["repo"] == "org/instruct" and "hub" not in provenance["target"]
    capsys.readouterr()
    assert cli.main(["chat-vector", str(target), "--base", "org/missing", "--instruct", "org/instruct", "--out", "other"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "org/missing is not in the Hugging Face cache" in error
    assert not (tmp_path / "other").exists()


#: The child's own peak (VmHWM starts afresh at exec; ru_maxrss would carry over the parent's peak from the fork).
_PEAK = """
import re, sys, elo_cpt
elo_cpt.chat_vector(*sys.argv[1:5])
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak memory from /proc")
def test_memory_does_not_grow_with_the_model(tmp_path):
    """Streamed: the peak memory of a trio of 8 tensors of 64 MiB is that of a trio of 2 (holding one whole model
    would add 384 MiB, three models over 1 GiB). Tensors above glibc's largest mmap threshold (32 MiB) go back to
    the system when freed, so the peak does not depend on how the allocator reuses memory."""
    peaks = {}
    for count in (2, 8):
        paths = []
        for seed, role in enumerate(("base", "instruct", "target")):
            path = save_tiny_model(tmp_path / f"{role}{count}", "llama", num_layers=1, seed=seed)
            generator = torch.Generator().manual_seed(seed)
            save_file({f"extra.{k}": torch.randn(4096, 4096, generator=generator) for k in range(count)},
                      path / checkpoint.SAFETENSORS_SINGLE, metadata={"format": "pt"})
            paths.append(path)
        base, instruct, target = paths
        result = subprocess.run([sys.executable, "-c", _PEAK, str(target), str(base), str(instruct), str(tmp_path / f"out{count}")],
                                capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        peaks[count] = int(result.stdout.split()[-1]) / 1024
        for path in (*paths, tmp_path / f"out{count}"):
            shutil.rmtree(path)
    assert peaks[8] - peaks[2] < 128, peaks
