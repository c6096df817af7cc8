"""The memory-lean optimizers of full-parameter training (adafactor, adamw_8bit, galore, apollo): each trains a tiny
model through Trainer's own construction, keeps less state than AdamW (bytes of its state tensors, counted), and
reaches `elo align` through the config."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from elo_cpt import engine, precision, train
from elo_cpt.config import OPTIMIZERS, TrainConfig, validate_train
from elo_cpt.errors import EloError

LEAN = ("adafactor", "adamw_8bit", "galore", "apollo")


def wide_tiny_model(seed: int = 0):
    """Two layers 64 wide: bitsandbytes quantizes only tensors of 4,096 elements or more, conftest's 32-wide layers have none."""
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter: moments, quantization maps, and the tensors held by
    objects in the state (galore's and apollo's projectors hold their projection matrix)."""
    values = [v for state in optimizer.state.values() for v in state.values()]
    values += [v for obj in values if hasattr(obj, "__dict__") and not torch.is_tensor(obj) for v in vars(obj).values()]
    return sum(t.numel() * t.element_size() for t in values if torch.is_tensor(t))


def steps(name: str, count: int = 6, rank: int = 8) -> tuple[list[float], torch.nn.Module, dict, torch.optim.Optimizer]:
    model = wide_tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = engine.make_optimizer(model, TrainConfig(lr=3e-3, optimizer=name, optimizer_rank=rank))
    ids = torch.randint(384, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(count):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, model, before, optimizer


@functools.cache
def one_step_state_bytes(name: str) -> int:
    """State bytes after one step (shared by the tests that count them: each optimizer is built once)."""
    return state_bytes(steps(name, count=1)[3])


@pytest.mark.parametrize("name", ("adamw", *LEAN))
def test_each_optimizer_trains_every_parameter(name):
    losses, model, before, _ = steps(name)
    assert losses[-1] < losses[0] - 0.05, losses
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_lean_optimizers_keep_less_state_than_adamw():
    """AdamW keeps two fp32 moments per parameter; each lean option keeps less (counted after one step, when every
    state tensor exists): adafactor a row and a column per matrix, adamw_8bit one byte per moment of tensors of 4,096+
    elements, galore and apollo AdamW moments of rank-8 projections of the decoder layers' linear weights."""
    sizes = {name: one_step_state_bytes(name) for name in ("adamw", *LEAN)}
    params = sum(p.numel() for p in wide_tiny_model().parameters())
    assert sizes["adamw"] == 8 * params + 4 * len(list(wide_tiny_model().parameters()))  # two moments, plus a step counter each
    for name in LEAN:
        assert sizes[name] < 0.75 * sizes["adamw"], (name, sizes)
    assert sizes["adafactor"] < 0.05 * sizes["adamw"], sizes


@pytest.mark.parametrize("name", ("galore", "apollo"))
def test_low_rank_optimizers_project_only_the_decoder_linears(name):
    optimizer = steps(name, count=1)[3]
    low_rank = [g for g in optimizer.param_groups if "rank" in g]
    assert [g["rank"] for g in low_rank] == [8]
    assert len(low_rank[0]["params"]) == 2 * 7  # q, k, v, o, gate, up, down of both layers


def test_optimizer_names_and_errors(monkeypatch):
    assert set(LEAN) <= set(OPTIMIZERS)
    with pytest.raises(EloError, match="optimizer must be one of"):
        validate_train(TrainConfig(optimizer="lion"))
    with pytest.raises(EloError, match="optimizer_rank must be >= 1"):
        validate_train(TrainConfig(optimizer="galore", optimizer_rank=0))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    with pytest.raises(EloError, match="optimizer galore needs galore-torch; pip install galore-torch"):
        precision.optimizer(TrainConfig(optimizer="galore"))


def test_align_with_galore_and_checkpointing(tiny_model, tmp_path, corpora):
    """The config reaches Trainer: galore's target modules and rank, activation checkpointing; every tensor moves."""
    from safetensors.torch import load_file

    stats = train.align(tiny_model, [str(corpora["train_de"])], tmp_path / "aligned",
                        TrainConfig(tokens=256, lr=1e-3, batch_size=2, optimizer="galore", optimizer_rank=4,
                                    gradient_checkpointing=True, report_to=["none"]), seq_len=32)
    assert stats.tokens == 256
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "aligned" / "model.safetensors")
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_cost_model_counts_the_state_each_optimizer_keeps():
    """costmodel.optimizer_state_bytes (what `elo plan` adds up) against the bytes counted after one step: exact but
    for per-tensor scalars (AdamW's step counters, Adafactor's RMS, APOLLO's scale: at most 4 bytes per tensor)."""
    from elo_cpt import costmodel

    model = wide_tiny_model()
    shape = costmodel.Shape.from_config(model.config)
    tensors = costmodel.trainable_tensors(shape, "fft", [])
    assert sum(m * n for _, m, n in tensors) == sum(p.numel() for p in model.parameters())
    scalars = 4 * len(list(model.parameters()))
    for name in ("adamw", *LEAN):
        counted = one_step_state_bytes(name)
        modelled = costmodel.optimizer_state_bytes(tensors, name, rank=8)
        assert 0 <= counted - modelled <= scalars, (name, counted, modelled)
