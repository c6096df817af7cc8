"""`elo plan`: memory per GPU of each stage from the cost model, whether it fits, the cheapest setting that does, and
the time; on named shapes, a model folder and a hub id (config only)."""

from __future__ import annotations

import json

import pytest

from elo_cpt import cli, costmodel, hub, planner
from elo_cpt.errors import EloError

GB = 1e9


def test_8b_on_eight_80gb_gpus_shards_the_alignment():
    result = planner.plan("llama-3.1-8b", gpus=8, gpu_memory=80)
    stage1, align, fft = (result["stages"][k] for k in ("stage1", "align", "fft"))
    assert stage1["fits"] and not align["fits"] and not fft["fits"]
    # sharding alone makes the alignment fit: the cheapest change (penalty 1)
    assert (align["fix"]["shard"], align["fix"]["optimizer"], align["fix"]["checkpointing"]) == (True, "adamw", False)
    shape = costmodel.Shape.from_config(planner.model_config("llama-3.1-8b"))
    sharded = costmodel.estimate_memory_bytes(shape, "align", [0, 31], 4, 256, activation_bytes=2, shards=8)
    assert align["fix"]["memory_total_bytes"] == sharded["total"] < 0.9 * 80 * GB
    # weights, gradients and AdamW state of 8.03B fp32 parameters, split 8 ways
    assert sharded["weights"] + sharded["gradients"] + sharded["optimizer"] == pytest.approx(8_030_261_248 * 16 / 8, abs=8)
    assert sharded["logits"] == 3 * 4 * 256 * 128256 * 4  # the loss is not chunked under sharding


def test_one_24gb_gpu_fits_stage1_and_nothing_makes_the_8b_alignment_fit():
    result = planner.plan("llama-3.1-8b", gpus=1, gpu_memory=24, batch=1)
    assert result["stages"]["stage1"]["fits"]
    assert result["stages"]["align"]["fix"] is None and result["stages"]["fft"]["fix"] is None


def test_the_cheapest_fix_prefers_8bit_adamw_to_checkpointing_and_low_rank():
    shape = costmodel.Shape.from_config(planner.model_config("smollm2-135m"))
    need = {opt: costmodel.estimate_memory_bytes(shape, "fft", [0, 29], 4, 256, activation_bytes=2, optimizer=opt)["total"]
            for opt in ("adamw", "adamw_8bit")}
    memory = (need["adamw"] + need["adamw_8bit"]) / 2 / 0.9 / GB  # 8-bit AdamW fits, AdamW does not
    fix = planner.plan("smollm2-135m", gpus=1, gpu_memory=memory)["stages"]["fft"]["fix"]
    assert (fix["optimizer"], fix["checkpointing"], fix["precision"], fix["shard"]) == ("adamw_8bit", False, "bf16-mixed", False)


def test_times_follow_the_throughput_and_checkpointing():
    shape = costmodel.Shape.from_config(planner.model_config("smollm2-135m"))
    flops = {m: costmodel.step_cost(shape, m, [0, 29]) for m in ("elo", "fft")}
    plain = planner.plan("smollm2-135m", gpus=2, gpu_memory=80, tokens=1e8, tokens_per_s=1e4)["stages"]
    assert plain["fft"]["seconds"] == pytest.approx(1e4)
    assert plain["align"]["seconds"] == pytest.approx(1e3)
    assert plain["stage1"]["seconds"] == pytest.approx(0.9e8 / (1e4 * flops["fft"].flops_per_token / flops["elo"].flops_per_token))
    recomputed = planner.plan("smollm2-135m", gpus=2, gpu_memory=80, tokens=1e8, tokens_per_s=1e4, checkpointing=True)["stages"]
    fft = flops["fft"]
    assert recomputed["fft"]["seconds"] == pytest.approx(1e4 * (fft.flops_per_token + fft.forward_flops) / fft.flops_per_token)
    assert recomputed["fft"]["memory_bytes"]["activations"] < plain["fft"]["memory_bytes"]["activations"] / 5
    default = planner.plan("smollm2-135m", gpus=2, gpu_memory=80)
    assert default["tokens"] == planner.DEFAULT_TOKENS
    assert default["fft_tokens_per_s"] == pytest.approx(2 * 989e12 * 0.4 / fft.flops_per_token)


def test_model_folder_hub_id_and_errors(tiny_model, monkeypatch):
    folder = planner.plan(str(tiny_model), gpus=1, gpu_memory=1)
    assert folder["shape"]["num_layers"] == 5 and all(s["fits"] for s in folder["stages"].values())
    monkeypatch.setattr(hub, "config_folder", lambda spec: tiny_model)  # what the hub fetch returns: a folder with config.json
    assert planner.plan("someorg/tiny", gpus=1, gpu_memory=1)["shape"] == folder["shape"]
    monkeypatch.undo()
    with pytest.raises(EloError, match="not in the Hugging Face cache"):  # tests run with HF_HUB_OFFLINE=1
        planner.plan("no-such-org/no-such-model", gpus=1, gpu_memory=1)
    with pytest.raises(EloError, match="bf16-true goes with optimizer adamw_kahan"):
        planner.plan("smollm2-135m", gpu_memory=8, precision="bf16-true")
    with pytest.raises(EloError, match="--gpus"):
        planner.plan("smollm2-135m", gpus=0, gpu_memory=8)


def test_plan_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "smollm2-135m", "--gpus", "1", "--gpu-memory", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage1" in printed and "cheapest that fits" in printed and "time: ELO" in printed
    assert json.loads(out.read_text())["stages"]["fft"]["fix"]["memory_total_bytes"] <= 0.9 * 2 * GB


def test_step_in_backward_is_chosen_when_only_it_fits_on_one_gpu_and_never_on_two():
    shape = costmodel.Shape.from_config(planner.model_config("smollm2-135m"))

    def least(gpus: int, in_backward: bool) -> int:
        return min(planner.estimate(shape, "fft", [0, 29], s, gpus, 4, 256, 1024, 128)["total"]
                   for s in planner.candidates(gpus) if s.step_in_backward == in_backward)

    assert least(1, True) < least(1, False)
    memory = (least(1, True) + least(1, False)) / 2 / 0.9 / GB  # only a setting with step_in_backward fits
    fix = planner.plan("smollm2-135m", gpus=1, gpu_memory=memory)["stages"]["fft"]["fix"]
    assert fix["step_in_backward"] and fix["optimizer"] in ("adamw", "adamw_kahan", "adafactor")
    assert "step in backward" in fix["description"]
    assert not any(s.step_in_backward for s in planner.candidates(2))
    two = planner.plan("smollm2-135m", gpus=2, gpu_memory=memory)["stages"]["fft"]["fix"]
    assert two is None or not two["step_in_backward"]
    stated = planner.plan("smollm2-135m", gpus=1, gpu_memory=80, optimizer="adafactor", step_in_backward=True)
    assert stated["stages"]["fft"]["memory_bytes"]["gradients"] == 49152 * 576 * 4
    for gpus, optimizer in ((2, "adamw"), (1, "galore")):
        with pytest.raises(EloError, match="--step-in-backward runs on one GPU with optimizer adamw, adamw_kahan, adafactor"):
            planner.plan("smollm2-135m", gpus=gpus, gpu_memory=80, optimizer=optimizer, step_in_backward=True)
