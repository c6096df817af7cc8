"""The training engine: chunked loss, baselines, lean checkpoints, SIGKILL-and-resume, and DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import VOCAB, assert_resumed, crash_at_step, free_port, make_tokenizer, save_tiny_model
from elo_cpt import engine, surgery, train
from elo_cpt.config import TrainConfig


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_loss_matches_the_full_loss_and_its_gradients(tmp_path, arch):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "m", arch))
    tokens = torch.randint(0, VOCAB, (3, 20))
    labels = tokens.clone()
    labels[0, :5] = -100
    full = model(input_ids=tokens, labels=labels).loss
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    head = model.get_output_embeddings()
    model.set_output_embeddings(engine.Passthrough())
    hidden = model(input_ids=tokens).logits
    model.set_output_embeddings(head)
    chunked = engine.chunked_lm_loss(head, hidden, labels, chunk=7)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_is_off_for_soft_capped_heads(tmp_path):
    gemma = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "g", "gemma2"))
    llama = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "l", "llama"))
    assert not engine.supports_chunked_loss(gemma, distributed=False)
    assert engine.supports_chunked_loss(llama, distributed=False)
    assert not engine.supports_chunked_loss(llama, distributed=True)  # trainable tied head under DDP
    llama.requires_grad_(False)
    assert engine.supports_chunked_loss(llama, distributed=True)


@pytest.mark.parametrize("method", ["fft", "freeze", "lora"])
def test_baselines_train_what_they_should(tiny_model, tmp_path, corpora, method):
    cfg = TrainConfig(tokens=640, lr=1e-2, batch_size=2, lora_rank=4)
    stats = train.finetune(tiny_model, [str(corpora["train_de"])], tmp_path / method, cfg, seq_len=32, method=method, layers="0,-1")
    before, after = tensors(tiny_model), tensors(tmp_path / method)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "fft":
        assert changed == set(before)
    elif method == "freeze":
        assert changed and all(k.startswith(("model.layers.0.", "model.layers.4.")) for k in changed)
        assert stats.trainable_params == sum(before[k].numel() for k in before if k.startswith(("model.layers.0.", "model.layers.4.")))
    else:  # LoRA adapters on every linear layer, merged back: exactly the decoder's linear weights move
        assert changed == {k for k in before if k.startswith("model.layers.") and k.endswith("proj.weight")}
        # rank 4 x (in + out) per linear layer: q, o 32+32; k, v 32+16; gate, up, down 32+64; five layers
        assert stats.trainable_params == 5 * 4 * (2 * 64 + 2 * 48 + 3 * 96) == 10_240
    # A standard model folder (no adapters left): transformers loads exactly the saved weights, none missing.
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / method).named_parameters())
    assert loaded.keys() == after.keys() and not (tmp_path / method / "adapter_config.json").exists()
    assert all(torch.equal(loaded[k], after[k]) for k in after)


def test_checkpoints_hold_only_trainable_tensors(tiny_model, tmp_path, corpora):
    surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
    with crash_at_step(5):
        train.pretrain(tmp_path / "shallow", [str(corpora["train_de"])], tmp_path / "s1", TrainConfig(batch_size=2, save_steps=2), seq_len=32)
    saved = tensors(tmp_path / "s1.partial" / "checkpoints" / "checkpoint-4")
    assert saved and all(k.startswith("model.layers.") for k in saved)
    assert "model.embed_tokens.weight" not in saved


# ---- subprocess tests: the `elo` command as users run it, killed with SIGKILL, or under torchrun


def _elo(*args: object, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable, "-m", "elo_cpt.cli"]), *map(str, args)]


def _bigger_model(path: Path) -> Path:
    """Slow enough per step (tens of ms) that a kill lands mid-run."""
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("stage", ["pretrain", "align"])
def test_sigkill_and_rerun_gives_the_uninterrupted_weights(tmp_path, corpora, stage):
    base = _bigger_model(tmp_path / "base")
    model = base
    if stage == "pretrain":
        surgery.detach(base, "0,-1", tmp_path / "shallow")
        model = tmp_path / "shallow"
    common = ("--data", corpora["train_de"], "--data", f"{corpora['train_en']}@0.1", "--tokens", 4096, "--seq-len", 64,
              "--batch-size", 2, "--lr", 1e-3, "--save-steps", 4)
    subprocess.run(_elo(stage, model, *common, "--out", tmp_path / "straight"), check=True, env=ENV, capture_output=True)

    partial = tmp_path / "killed.partial" / "checkpoints"
    process = subprocess.Popen(_elo(stage, model, *common, "--out", tmp_path / "killed"), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (partial / "checkpoint-8").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists(), "the run finished before it could be killed; make the model slower"
    # What the killed invocation had trained, as it wrote it on the way (at the start, each second, each checkpoint).
    killed = json.loads((tmp_path / "killed.partial" / train.CLOCK_FILE).read_text())
    assert killed["invocations"] == 1 and killed["seconds"] > 0
    rerun = subprocess.run(_elo(stage, model, *common, "--out", tmp_path / "killed"), check=True, env=ENV, capture_output=True, text=True)
    # It resumed, not restarted: from the last checkpoint the killed run completed, training only the steps after it
    # (its own TensorBoard file; the uninterrupted run logged every one of its 32 steps).
    assert_resumed(rerun.stderr, partial, tmp_path / "straight", tmp_path / "killed", steps=32, every=4)
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "killed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "killed.partial").exists()
    # The stage's seconds are both invocations' (the rerun's own share comes on top of the killed one's); tokens
    # are those trained into the weights, as in the uninterrupted run.
    stats = json.loads((tmp_path / "killed" / train.STATS_FILE).read_text())
    straight_stats = json.loads((tmp_path / "straight" / train.STATS_FILE).read_text())
    assert (stats["resumes"], straight_stats["resumes"]) == (1, 0)
    assert stats["seconds"] > killed["seconds"] and stats["tokens"] == straight_stats["tokens"] == 4096


def test_two_process_ddp_matches_one_process(tmp_path, corpora):
    base = save_tiny_model(tmp_path / "base")
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    common = ("--data", corpora["train_de"], "--tokens", 1280, "--seq-len", 32, "--lr", 1e-3, "--grad-accum", 1)
    subprocess.run(_elo("pretrain", tmp_path / "shallow", *common, "--batch-size", 4, "--out", tmp_path / "one"),
                   check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "elo_cpt.cli"]
    result = subprocess.run(_elo("pretrain", tmp_path / "shallow", *common, "--batch-size", 2, "--out", tmp_path / "two", launcher=torchrun),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / train.STATS_FILE).read_text())
    two = json.loads((tmp_path / "two" / train.STATS_FILE).read_text())
    assert (one["processes"], two["processes"], two["sharding"]) == (1, 2, None)
    assert one["steps"] == two["steps"] == 10 and one["tokens"] == two["tokens"] == 1280
    assert [s for s, _ in one["losses"]] == [s for s, _ in two["losses"]]
    for (_, a), (_, b) in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    for key, value in tensors(tmp_path / "one").items():
        torch.testing.assert_close(tensors(tmp_path / "two")[key], value, rtol=1e-4, atol=1e-5)

