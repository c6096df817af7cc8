"""Where users train: bf16 precisions and gradient accumulation, on tiny models (CPU bf16 autocast, gloo) and SmolLM2 (slow).

Tolerances: accumulation changes only the order of float additions, so losses agree to 1e-5 relative and weights
to 1e-4 relative / 1e-6 absolute. bf16-mixed against fp32 on SmolLM2's stage 1 with bridges: within 2% per logged
loss (bf16 keeps 8 bits of mantissa, so activations carry ~0.4% rounding). Without bridges the shallow model's loss
is ~38 nats/token, its logits are huge, and bf16's rounding moves the loss by up to 2.6% after seven steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import assert_resumed, free_port, save_tiny_model
from elo_cpt import checkpoint, data, surgery, train
from elo_cpt.config import TrainConfig
from elo_cpt.errors import EloError
from test_engine import ENV, _elo

SEQ = 32


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def fraction_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> float:
    names = [n for n in before if n.startswith(prefix)]
    changed = sum((before[n] != after[n]).sum().item() for n in names)
    return changed / sum(before[n].numel() for n in names)


def one_step(**settings) -> TrainConfig:
    """A config that trains exactly one optimizer step of 4 sequences at the full learning rate."""
    return TrainConfig(**{"tokens": 4 * SEQ, "batch_size": 4, "lr": 1.5e-5, "warmup_ratio": 0.0, "schedule": "constant", **settings})


@pytest.fixture
def shallow(tiny_model, tmp_path) -> Path:
    surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
    return tmp_path / "shallow"


def test_bf16_mixed_step_moves_every_trained_weight(shallow, tmp_path, corpora):
    train.pretrain(shallow, [str(corpora["train_de"])], tmp_path / "out", one_step(precision="bf16-mixed"), seq_len=SEQ)
    before, after = tensors(shallow), tensors(tmp_path / "out")
    assert fraction_changed(before, after, "model.layers.") > 0.99
    assert fraction_changed(before, after, "model.embed_tokens") == 0  # frozen stays bit-identical
    assert all(t.dtype == torch.float32 for t in after.values())  # saved in the input's dtype
    stats = json.loads((tmp_path / "out" / train.STATS_FILE).read_text())
    assert stats["precision"] == "bf16-mixed"
    assert stats["hardware"]["device"] == "cpu" and stats["hardware"]["torch"] == torch.__version__


def test_pure_bf16_step_drops_most_updates(shallow, corpora, tokenizer):
    """What bf16-mixed guards against, shown with the same criterion: bf16 weights under plain AdamW barely move."""
    model = AutoModelForCausalLM.from_pretrained(shallow, dtype=torch.bfloat16)
    train.train_only_layers(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = data.load_training_data([str(corpora["train_de"])], checkpoint.load_tokenizer(shallow), SEQ, 4 * SEQ, cache_dir=None)
    ids = torch.stack([batch[i]["input_ids"] for i in range(4)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-5, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert fraction_changed(before, after, "model.layers.") < 0.5


def test_bf16_true_needs_a_kahan_optimizer(shallow, tmp_path, corpora):
    with pytest.raises(EloError, match="bf16-true needs optimizer adamw_kahan"):
        train.pretrain(shallow, [str(corpora["train_de"])], tmp_path / "out", one_step(precision="bf16-true"), seq_len=SEQ)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(EloError, match="precision must be one of"):
        train.pretrain(shallow, [str(corpora["train_de"])], tmp_path / "out", one_step(precision="fp8"), seq_len=SEQ)


def test_bf16_true_with_kahan_summation_trains_bf16_weights(tmp_path, corpora):
    pytest.importorskip("optimi")
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "fp32")).to(torch.bfloat16).save_pretrained(base)
    checkpoint.copy_side_files(tmp_path / "fp32", base, skip=("config.json",))
    cfg = one_step(precision="bf16-true", optimizer="adamw_kahan", tokens=8 * 4 * SEQ, lr=1e-4)
    train.finetune(base, [str(corpora["train_de"])], tmp_path / "out", cfg, seq_len=SEQ)
    before, after = tensors(base), tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    # eight steps of ~1e-4 add up past half a bf16 ulp of most weights, which plain AdamW would round away one by one
    assert fraction_changed(before, after, "model.layers.") > 0.9


@pytest.mark.parametrize("method,chunk", [("elo", 1024), ("fft", 1024), ("fft", 0)])
def test_gradient_accumulation_matches_the_same_global_batch(tiny_model, tmp_path, corpora, method, chunk):
    """4 x 1, 2 x 2 and 1 x 4 sequences: the same logged losses and final weights, with clipping on."""
    model = tiny_model
    if method == "elo":
        surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
        model = tmp_path / "shallow"
    results = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = TrainConfig(tokens=6 * 4 * SEQ, batch_size=batch, grad_accum=accum, lr=1e-3, max_grad_norm=1.0, loss_chunk=chunk)
        out = tmp_path / f"{method}-{batch}x{accum}"
        stats = (train.pretrain(model, [str(corpora["train_de"])], out, cfg, seq_len=SEQ) if method == "elo"
                 else train.finetune(model, [str(corpora["train_de"])], out, cfg, seq_len=SEQ))
        results.append((stats, tensors(out)))
    (reference, weights), *others = results
    assert reference.steps == 6 and len(reference.losses) == 6
    for stats, other in others:
        assert [s for s, _ in stats.losses] == [s for s, _ in reference.losses]
        for (_, a), (_, b) in zip(stats.losses, reference.losses):
            assert a == pytest.approx(b, rel=1e-5)
        for key, value in weights.items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_across_two_processes(shallow, tmp_path, corpora):
    """2 processes x 1 sequence x 2 accumulation steps give what one process with 4 sequences gives."""
    common = ("--data", corpora["train_de"], "--tokens", 6 * 4 * SEQ, "--seq-len", SEQ, "--lr", 1e-3)
    subprocess.run(_elo("pretrain", shallow, *common, "--batch-size", 4, "--out", tmp_path / "one"), check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "elo_cpt.cli"]
    result = subprocess.run(_elo("pretrain", shallow, *common, "--batch-size", 1, "--grad-accum", 2, "--out", tmp_path / "two",
                                 launcher=torchrun), env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / train.STATS_FILE).read_text())
    two = json.loads((tmp_path / "two" / train.STATS_FILE).read_text())
    assert two["processes"] == 2 and one["steps"] == two["steps"] == 6
    for (_, a), (_, b) in zip(one["losses"], two["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for key, value in tensors(tmp_path / "one").items():
        torch.testing.assert_close(tensors(tmp_path / "two")[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_mixed_stage1_tracks_fp32_on_smollm2(tmp_path):
    """Stage 1 as `elo run` trains it (with bridges): the bf16-mixed loss curve stays within 2% of fp32's. bf16 is
    slow on CPUs, hence only six steps of 2 x 64 tokens."""
    from elo_cpt.demo.assets import prepare_assets

    assets = prepare_assets()
    surgery.detach(assets.model, "0,-1", tmp_path / "shallow")
    train.bridge(tmp_path / "shallow", [str(assets.train_target)], 4096, seq_len=64)
    curves = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = TrainConfig(tokens=6 * 2 * 64, batch_size=2, lr=1.5e-5, precision=precision)
        stats = train.pretrain(tmp_path / "shallow", [str(assets.train_target)], tmp_path / precision, cfg, seq_len=64)
        curves[precision] = [loss for _, loss in stats.losses]
    assert len(curves["32-true"]) == 6
    for a, b in zip(curves["32-true"], curves["bf16-mixed"], strict=True):
        assert b == pytest.approx(a, rel=0.02), curves


def test_elo_run_on_two_processes_matches_one(tiny_model, corpora, tmp_path):
    """The whole `elo run` under torchrun (gloo): one process prepares, detaches, merges, evaluates and reports, both
    train. Global batches equal those of one process, so the final weights agree (to 1e-4 absolute; the alignment's
    trainable tied head turns the chunked loss off under DDP, which changes the order of float additions)."""
    settings = [f"model={tiny_model}", f"data.target=[{corpora['train_de']}]", f"data.english=[{corpora['train_en']}]",
                f"data.eval={{de: {corpora['eval_de']}, en: {corpora['eval_en']}}}", "seq_len=32", "stage1.tokens=1280",
                "stage1.lr=1e-3", "align.tokens=256", "align.lr=1e-3", "eval.max_chars=2000", "eval.sample_tokens=4"]
    one = subprocess.run([sys.executable, "-m", "elo_cpt.cli", "run", *settings, "stage1.batch_size=4", "align.batch_size=4",
                          "--out", str(tmp_path / "one")], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "elo_cpt.cli"]
    two = subprocess.run([*torchrun, "run", *settings, "stage1.batch_size=2", "align.batch_size=2", "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("[6/6] evaluating") == 1 and two.stdout.count("report.html") == 1  # one process speaks and reports
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")}
    assert metrics["one"].keys() == metrics["two"].keys() and metrics["one"]["stages"].keys() == metrics["two"]["stages"].keys()
    for stage in ("stage1", "align"):
        assert metrics["two"]["stages"][stage]["training"]["processes"] == 2
        assert metrics["two"]["stages"][stage]["training"]["tokens"] == metrics["one"]["stages"][stage]["training"]["tokens"]
    for key, value in tensors(tmp_path / "one" / "model").items():
        torch.testing.assert_close(tensors(tmp_path / "two" / "model")[key], value, rtol=1e-3, atol=1e-4)
    assert not list(tmp_path.glob(".two.*")) and not list((tmp_path / "two").glob("**/*.partial"))


def test_killing_one_rank_then_rerunning_resumes(tmp_path, corpora):
    """SIGKILL of the second process of a two-process stage: torchrun stops the group; the same command resumes
    from the last complete checkpoint and ends at the weights of an uninterrupted two-process run."""
    import signal
    import time

    from test_engine import _bigger_model

    base = _bigger_model(tmp_path / "base")
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "elo_cpt.cli"]
    common = ("--data", corpora["train_de"], "--tokens", 4096, "--seq-len", 64, "--batch-size", 1, "--lr", 1e-3, "--save-steps", 4)
    subprocess.run(_elo("pretrain", tmp_path / "shallow", *common, "--out", tmp_path / "straight", launcher=torchrun),
                   check=True, env=ENV, capture_output=True)
    launcher = subprocess.Popen(_elo("pretrain", tmp_path / "shallow", *common, "--out", tmp_path / "killed", launcher=torchrun),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, deadline = tmp_path / "killed.partial" / "checkpoints", time.time() + 300
    while not (partial / "checkpoint-8").is_dir() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    ranks = {}
    for pid in Path("/proc").iterdir():
        try:
            environ = (pid / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MASTER_PORT={port}".encode() in environ and b"RANK=1" in environ:
            ranks[int(pid.name)] = environ
    assert ranks, "rank 1 was not found; did the run finish before it could be killed?"
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (tmp_path / "killed").exists()
    rerun = subprocess.run(_elo("pretrain", tmp_path / "shallow", *common, "--out", tmp_path / "killed", launcher=torchrun),
                           env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # It resumed from the last complete checkpoint and trained only the steps after it (rank 0's TensorBoard file).
    assert_resumed(rerun.stderr, partial, tmp_path / "straight", tmp_path / "killed", steps=32, every=4)
    for key, value in tensors(tmp_path / "straight").items():
        torch.testing.assert_close(tensors(tmp_path / "killed")[key], value, rtol=1e-5, atol=1e-6)


def test_a_budget_that_cannot_fill_one_global_batch_is_refused(shallow, tmp_path, corpora):
    cfg = TrainConfig(tokens=2 * SEQ, batch_size=2, grad_accum=2)
    with pytest.raises(EloError, match="2 sequences of 32 tokens cannot fill one optimizer step of 2 sequences x 2"):
        train.pretrain(shallow, [str(corpora["train_de"])], tmp_path / "out", cfg, seq_len=SEQ)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_trackers_logging_steps_and_the_kv_cache_setting(tiny_model, tmp_path, corpora):
    """report_to none writes no TensorBoard logs; logging_steps sets the loss points; use_cache is kept."""
    cfg = TrainConfig(tokens=6 * 4 * SEQ, logging_steps=3, report_to=["none"])
    stats = train.finetune(tiny_model, [str(corpora["train_de"])], tmp_path / "out", cfg, seq_len=SEQ)
    assert [s for s, _ in stats.losses] == [3, 6]
    assert not (tmp_path / "out" / "logs").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    with pytest.raises(EloError, match="report_to takes some of"):
        train.finetune(tiny_model, [str(corpora["train_de"])], tmp_path / "bad", TrainConfig(report_to=["tensorbored"]), seq_len=SEQ)
