"""`elo bench` and its cost model: the FLOP figures of docs/costmodel.md, and a CLI smoke run on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from elo_cpt import costmodel
from elo_cpt.errors import EloError

LLAMA_8B = costmodel.Shape(num_layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False)
SMOLLM2 = costmodel.Shape(num_layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True)


def gflops(shape, method, layers):
    return costmodel.step_cost(shape, method, layers).flops_per_token / 1e9


def test_shapes_match_published_sizes():
    # Llama-3.1-8B: 218M per layer, a 525M head, 8.03B in all (its exact count); SmolLM2-135M: 3.5M per layer.
    assert LLAMA_8B.layer_params == 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 == 218_103_808
    assert LLAMA_8B.head_params == 128256 * 4096 == 525_336_576
    assert LLAMA_8B.total_params() == 8_030_261_248
    assert SMOLLM2.layer_params == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 == 3_538_944
    assert SMOLLM2.total_params() == 134_515_008  # SmolLM2-135M's exact parameter count


_MOE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            num_hidden_layers=4, num_experts_per_tok=2)


@pytest.mark.parametrize("model_type, settings", [
    ("mixtral", dict(num_local_experts=4)),
    ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3], head_dim=8)),
])
def test_moe_costs_count_routed_experts(model_type, settings):
    """Per layer, the cost model's parameters match the real module's: every expert for the weights, the routed
    ones for the FLOPs (nn.Linear weights, the router, and experts_per_token / experts of the fused expert
    tensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_MOE, **settings)
    shape = costmodel.Shape.from_config(config)
    model = AutoModelForCausalLM.from_config(config)
    for index, layer in enumerate(model.model.layers):
        linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        fused = sum(p.numel() for p in layer.parameters() if p.dim() == 3)
        router = layer.mlp.gate.weight.numel() if fused else 0
        assert shape.sparse(index) == (fused > 0), index
        assert shape.layer_params_at(index) == linear + router + fused
        assert shape.layer_active_params(index) == linear + router + fused * 2 // 4
    if model_type == "mixtral":  # no biases or q/k norms: the whole model is counted exactly
        assert shape.total_params() == sum(p.numel() for p in model.parameters())
    fft, elo = (costmodel.step_cost(shape, method, [0, 3]) for method in ("fft", "elo"))
    assert fft.trainable_params == shape.total_params()
    assert fft.forward_flops == 2 * (sum(map(shape.layer_active_params, range(4))) + shape.head_params)
    assert elo.forward_flops == 2 * (shape.layer_active_params(0) + shape.layer_active_params(3) + shape.head_params)


@pytest.mark.parametrize("shape, layers, method, expected", [
    (LLAMA_8B, [0, 31], "fft", 45.03), (LLAMA_8B, [0, 31], "align", 45.03), (LLAMA_8B, [0, 31], "freeze", 30.89),
    (LLAMA_8B, [0, 31], "lora", 30.27), (LLAMA_8B, [0, 31], "elo", 4.72),
    (SMOLLM2, [0, 29], "fft", 0.807), (SMOLLM2, [0, 29], "freeze", 0.552), (SMOLLM2, [0, 29], "lora", 0.567),
    (SMOLLM2, [0, 29], "elo", 0.156),
])
def test_flops_match_the_derivation(shape, layers, method, expected):
    """The GFLOP/token figures of docs/costmodel.md (and docs/benchmarks.md), to the digits they are printed with."""
    assert round(gflops(shape, method, layers), 3 if shape is SMOLLM2 else 2) == expected


def test_stage1_and_pipeline_bounds_match_the_derivation():
    for shape, layers, stage1, pipeline in ((LLAMA_8B, [0, 31], 9.54, 5.15), (SMOLLM2, [0, 29], 5.18, 3.65)):
        elo, fft = gflops(shape, "elo", layers), gflops(shape, "fft", layers)
        assert round(fft / elo, 2) == stage1
        assert round(costmodel.pipeline_speedup(1 / elo, 1 / fft, 1 / fft), 2) == pipeline
        assert fft / (0.9 * elo + 0.1 * fft) == pytest.approx(costmodel.pipeline_speedup(1 / elo, 1 / fft, 1 / fft))


def test_cost_model_rules():
    # freezing the first layer is the worst case: gradients flow through everything above it
    assert gflops(LLAMA_8B, "freeze", [0]) > gflops(LLAMA_8B, "freeze", [31])
    # the pipeline bound at 9:1 lies between stage 1's bound and 1
    elo, fft = gflops(LLAMA_8B, "elo", [0, 31]), gflops(LLAMA_8B, "fft", [0, 31])
    assert 1 < costmodel.pipeline_speedup(1 / elo, 1 / fft, 1 / fft) < fft / elo
    with pytest.raises(EloError):
        costmodel.step_cost(LLAMA_8B, "sgd", [0])


def test_fft_memory_of_8b_exceeds_this_machine():
    """The estimates docs/benchmarks.md and docs/costmodel.md quote, in GiB: fft of the 8B shape needs 123, stage 1 11."""
    estimate = costmodel.estimate_memory_bytes(LLAMA_8B, "fft", [0, 31], batch=1, seq=256)
    assert estimate["total"] > 24 * 2**30
    assert estimate["gradients"] + estimate["optimizer"] == LLAMA_8B.total_params() * 12
    gib = {key: round(value / 2**30, 2) for key, value in estimate.items()}
    assert gib == {"weights": 29.92, "gradients": 29.92, "optimizer": 59.83, "activations": 3.0, "logits": 0.37,
                   "gathered": 0, "total": 123.03}
    stage1 = costmodel.estimate_memory_bytes(LLAMA_8B, "elo", [0, 31], batch=1, seq=256)
    gib = {key: round(value / 2**30, 2) for key, value in stage1.items()}
    assert gib == {"weights": 5.54, "gradients": 1.63, "optimizer": 3.25, "activations": 0.19, "logits": 0.37,
                   "gathered": 0, "total": 10.97}


def test_named_shapes_cost_nothing_to_describe():
    from elo_cpt import benchmark as bench

    for name in bench.SHAPES:
        shape = costmodel.Shape.from_config(bench.load_config(name))
        assert shape.num_layers >= 16
    assert costmodel.Shape.from_config(bench.load_config("Llama-3.1-8B")) == LLAMA_8B
    assert costmodel.Shape.from_config(bench.load_config("SmolLM2-135M")) == SMOLLM2


def test_bench_cli_smoke(tiny_model, tmp_path):
    from elo_cpt import benchmark as bench

    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "elo_cpt.cli", "bench", str(tiny_model), "--methods", "elo,align,fft",
                             "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0", "--json", str(out),
                             "--align-method", "adafactor"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "pipeline at 9:1" in result.stdout and "pipeline peak memory" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"elo", "align", "fft"}
    # the align row trains as configured; ELO's memory need is its larger stage's, every peak net of the runtime
    align = report["methods"]["align"]
    assert (align["optimizer"], align["gradient_checkpointing"], report["align_method"]) == ("adafactor", False, "adafactor")
    assert align["estimated_memory_breakdown"]["optimizer"] < report["methods"]["fft"]["estimated_memory_breakdown"]["optimizer"] / 10
    net = {m: row["peak_memory_bytes"] - row["baseline_rss_bytes"] for m, row in report["methods"].items()}
    assert net == {m: row["net_peak_bytes"] for m, row in report["methods"].items()}
    assert report["pipeline_peak_vs_fft"] == max(net["elo"], net["align"]) / net["fft"]
    for row in report["methods"].values():
        for key in ("tokens_per_s", "peak_memory_bytes", "trainable_params", "flops_per_token", "bound_speedup_vs_fft",
                    "measured_speedup_vs_fft", "efficiency"):
            assert row[key] is not None and row[key] > 0, key
        assert row["measured"] and not row["peak_memory_estimated"]
    elo, fft = report["methods"]["elo"], report["methods"]["fft"]
    # The measured models train what the cost model counts: layers 0 and 4 (9,216 weights + 2 norms of 32 each), or
    # everything (tied 384 x 32 embedding, 5 layers, final norm).
    assert (elo["trainable_params"], fft["trainable_params"]) == (2 * (9216 + 64), 384 * 32 + 5 * (9216 + 64) + 32)
    shape = costmodel.Shape.from_config(bench.load_config(str(tiny_model)))
    elo_flops, fft_flops = (costmodel.step_cost(shape, m, [0, 4]).flops_per_token for m in ("elo", "fft"))
    assert (elo["flops_per_token"], fft["flops_per_token"]) == (elo_flops, fft_flops)
    assert elo["bound_speedup_vs_fft"] == fft_flops / elo_flops and fft["bound_speedup_vs_fft"] == 1
    assert fft["measured_speedup_vs_fft"] == 1
    assert report["pipeline_9_1"]["bound_speedup_vs_fft"] == costmodel.pipeline_speedup(1 / elo_flops, 1 / fft_flops, 1 / fft_flops)
    assert report["pipeline_9_1"]["measured_speedup_vs_fft"] > 0


def test_bench_rejects_unknown_input(tiny_model):
    from elo_cpt import benchmark as bench

    with pytest.raises(EloError, match="unknown method"):
        bench.bench(str(tiny_model), "elo,sgd")
    with pytest.raises(EloError, match="known shape"):
        bench.bench("no-such-model", "elo")
    with pytest.raises(EloError, match="unknown --align-method 'lion'"):
        bench.bench(str(tiny_model), "align", align_method="lion")
    with pytest.raises(EloError, match="bf16-true needs optimizer adamw_kahan"):
        bench.bench(str(tiny_model), "align", precision="bf16-true", align_method="galore")
