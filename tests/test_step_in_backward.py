"""`step_in_backward`: each weight steps inside the backward pass and its gradient is freed at once. It must train
exactly as the same optimizer stepped after the backward pass, keep at most one gradient alive, resume exactly from
a checkpoint, and refuse what it cannot do."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from elo_cpt import distributed, engine, train
from elo_cpt.config import TrainConfig, validate_train
from elo_cpt.errors import EloError
from conftest import crash_at_step
from test_optimizers import wide_tiny_model


def aligned(model_dir, corpora, out, **settings):
    cfg = TrainConfig(tokens=384, lr=2e-3, batch_size=2, save_steps=2, report_to=["none"], **settings)
    train.align(model_dir, [str(corpora["train_de"])], out, cfg, seq_len=32)
    return load_file(out / "model.safetensors")


def test_adamw_in_backward_trains_as_adamw_after_it(tiny_model, corpora, tmp_path):
    """Without global clipping (which step_in_backward cannot do) the two are the same updates."""
    after = aligned(tiny_model, corpora, tmp_path / "after", max_grad_norm=0.0)
    inside = aligned(tiny_model, corpora, tmp_path / "inside", step_in_backward=True)
    before = load_file(tiny_model / "model.safetensors")
    assert all(not torch.equal(before[k], inside[k]) for k in before)
    for k in after:
        torch.testing.assert_close(inside[k], after[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ("adamw", "adafactor"))
def test_at_most_one_gradient_is_alive(name):
    model = wide_tiny_model()
    optimizer = engine.make_optimizer(model, TrainConfig(lr=1e-3, optimizer=name, step_in_backward=True))
    alive = []
    for param in model.parameters():  # registered after the optimizer's hooks: runs once the weight has stepped
        param.register_post_accumulate_grad_hook(lambda _: alive.append(sum(p.grad is not None for p in model.parameters())))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(384, (2, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert len(alive) == len(list(model.parameters())) and max(alive) == 0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_an_interrupted_alignment_resumes_to_the_same_weights(tiny_model, corpora, tmp_path):
    """Every inner optimizer's state is in the checkpoint, and the scheduler's rate reaches them after a resume."""
    straight = aligned(tiny_model, corpora, tmp_path / "straight", optimizer="adafactor", step_in_backward=True)
    with crash_at_step(4):
        aligned(tiny_model, corpora, tmp_path / "resumed", optimizer="adafactor", step_in_backward=True)
    assert (tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = aligned(tiny_model, corpora, tmp_path / "resumed", optimizer="adafactor", step_in_backward=True)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_what_it_cannot_do_is_refused(monkeypatch):
    with pytest.raises(EloError, match="step_in_backward works with optimizer adamw, adamw_kahan, adafactor, not galore"):
        validate_train(TrainConfig(optimizer="galore", step_in_backward=True))
    with pytest.raises(EloError, match="cannot accumulate gradients: set grad_accum 1"):
        validate_train(TrainConfig(grad_accum=2, step_in_backward=True))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(EloError, match="runs on one process only"):
        engine.make_optimizer(wide_tiny_model(), TrainConfig(step_in_backward=True))


def test_the_cost_model_counts_one_gradient_the_largest():
    """`elo plan` and `elo bench`: each gradient is freed after its step, so only the largest (the tied embedding/head,
    whose gradient spans the whole backward pass) counts; everything else is as without."""
    from elo_cpt import benchmark, costmodel

    shape = costmodel.Shape.from_config(benchmark.load_config("smollm2-135m"))
    tensors = costmodel.trainable_tensors(shape, "align", [0, 29])
    everything, largest = sum(m * n for _, m, n in tensors), max(m * n for _, m, n in tensors)
    assert largest == 49152 * 576
    for dtype_bytes in (4, 2):
        plain, inside = (costmodel.estimate_memory_bytes(shape, "align", [0, 29], 2, 128, dtype_bytes=dtype_bytes,
                                                         optimizer="adafactor", step_in_backward=s) for s in (False, True))
        assert plain["total"] - inside["total"] == (everything - largest) * dtype_bytes
        assert {k: v for k, v in plain.items() if k not in ("gradients", "total")} == \
            {k: v for k, v in inside.items() if k not in ("gradients", "total")}
    with pytest.raises(EloError, match="one process only"):
        costmodel.estimate_memory_bytes(shape, "align", [0, 29], 2, 128, shards=2, step_in_backward=True)


def test_bench_aligns_in_backward_and_refuses_what_cannot(tiny_model, monkeypatch, capsys):
    """The align row's worker builds its optimizer with step_in_backward (run in this process here), the JSON and the
    table say so; optimizers that step the whole model at once are refused before anything runs."""
    from elo_cpt import benchmark

    seen = []
    monkeypatch.setattr(benchmark, "_run_isolated", lambda args: seen.append(args) or benchmark.measure(**args))
    result = benchmark.bench(str(tiny_model), "align", batch=2, seq=16, steps=1, warmup=1, precision="32-true",
                             align_method="adafactor", align_step_in_backward=True)
    align = result["methods"]["align"]
    assert seen[0]["step_in_backward"] and result["align_step_in_backward"] and align["step_in_backward"]
    assert align["tokens_per_s"] > 0 and align["estimated_memory_breakdown"]["gradients"] == 384 * 32 * 4  # the tied embedding
    assert "align" in capsys.readouterr().out
    assert "+ step in backward) vs fft" in benchmark.format_table({**result, "pipeline_peak_vs_fft": 0.5})
    for name in ("galore", "apollo", "adamw_8bit"):
        with pytest.raises(EloError, match=f"--align-step-in-backward steps one weight at a time, which --align-method {name} cannot"):
            benchmark.bench(str(tiny_model), "align", align_method=name, align_step_in_backward=True)
