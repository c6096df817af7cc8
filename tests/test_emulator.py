"""The distilled emulator of the removed middle (stage1.emulator_layers, `elo emulator`): distillation, its cache,
bad settings, and stage 1 around it with a write-back that never touches it."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from elo_cpt import config, costmodel, emulation, pipeline, study_runner
from elo_cpt.cli import main
from elo_cpt.errors import EloError
from conftest import save_tiny_model
from test_pipeline import tiny_run_config


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELO_CPT_CACHE", str(tmp_path / "cache"))


def _rows(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 200, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loss", emulation.LOSSES)
def test_distillation_lowers_the_error_against_the_teacher(tiny_model, loss):
    folder, info = emulation.build_emulator(tiny_model, "0,-1", 2, _rows(0, 24), lr=1e-3, loss=loss)
    assert info["sources"] == [1, 3] and info["gap"] == [0, 4] and info["steps"] == 5
    assert info["error_after"] < info["error_before"] and info["train_loss_last"] < info["train_loss_first"]
    assert info["token_error_after"] < info["token_error_before"] and info["cosine_after"] > info["cosine_before"]
    stored = safetensors.torch.load_file(folder / emulation.TENSORS)
    assert stored and all(name.split(".")[2] in ("1", "3") for name in stored)


def test_the_cache_is_reused_and_keyed_by_every_input(tiny_model, tmp_path, monkeypatch):
    first, _ = emulation.build_emulator(tiny_model, "0,-1", 2, _rows(0))
    other_base = save_tiny_model(tmp_path / "other", seed=1)
    variants = [(tiny_model, "0,-1", 2, _rows(1)),       # the data
                (tiny_model, "0,-1", 2, _rows(0, 12)),   # the budget
                (tiny_model, "0,-1", 3, _rows(0)),       # k
                (tiny_model, "0,1,-1", 2, _rows(0)),     # the layer set
                (other_base, "0,-1", 2, _rows(0)),       # the base model
    (tiny_model, "0,-1", 2, _rows(0), 1e-4),  # the learning rate
    (tiny_model, "0,-1", 2, _rows(0), emulation.EMULATOR_LR, 0, "mse")]  # the loss
    folders = {emulation.build_emulator(*variant)[0] for variant in variants}
    assert len(folders | {first}) == 8

    def no_distillation(*args, **kwargs):
        raise AssertionError("distilled again")

    monkeypatch.setattr(emulation, "_distill", no_distillation)
    assert emulation.build_emulator(tiny_model, "0,-1", 2, _rows(0))[0] == first


@pytest.mark.parametrize("layers, k, message", [
    ("0,-1", 4, "stage1.emulator_layers=4 must be between 1 and the 3 removed middle layers (1..3)"),
    ("0,2,-1", 1, "leave 2; turn the emulator off"),
    ("0:2", 1, "leave 0; turn the emulator off"),
    ("0,-1", 0, "between 1 and the 3 removed middle layers"),
])
def test_bad_emulators_are_refused(tiny_model, layers, k, message):
    with pytest.raises(EloError, match=message.replace("(", r"\(").replace(")", r"\)")):
        emulation.build_emulator(tiny_model, layers, k, _rows(0))


@pytest.mark.parametrize("override, message", [
    ("stage1.emulator_layers=-1", "stage1.emulator_layers must be >= 0"),
    ("stage1.emulator_tokens=16", "stage1.emulator_tokens must hold at least one sequence"),
    ("stage1.bridge_tokens=5000", "set stage1.bridge_tokens=0 \\(or auto\\) with an emulator"),
    ("stage1.frozen_layers=2", "use one of them"),
])
def test_bad_emulator_settings_are_one_line_errors(override, message):
    with pytest.raises(EloError, match=message):
        config.load_config(None, ["stage1.emulator_layers=2", override] if "layers=-1" not in override else [override])


def test_the_command_refuses_too_many_layers_in_one_line(tiny_model, corpora, capsys):
    assert main(["emulator", str(tiny_model), "--emulator-layers", "5", "--data", str(corpora["train_de"]),
                 "--tokens", "256", "--seq-len", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("elo: error: stage1.emulator_layers=5 must be between 1 and the 3 removed middle layers")


def test_a_run_with_an_emulator_trains_around_it_and_never_writes_it_back(tiny_model, corpora, tmp_path):
    cfg = tiny_run_config(tiny_model, corpora, "stage1.emulator_layers=2", "stage1.emulator_tokens=256",
                          "align.token_ratio=0", "eval.sample_tokens=0")
    pipeline.run(cfg, tmp_path / "run")
    stages = tmp_path / "run" / "stages"
    provenance = json.loads((stages / "stage1" / "elo_provenance.json").read_text())
    assert provenance["layers"] == [0, 1, 3, 4] and provenance["trained_layers"] == [0, 4]
    assert provenance["emulator"]["sources"] == [1, 3] and not (stages / "stage1" / "elo_bridges.safetensors").exists()
    distilled = safetensors.torch.load_file(next((tmp_path / "cache" / "emulators").iterdir()) / emulation.TENSORS)
    stage1 = safetensors.torch.load_file(stages / "stage1" / "model.safetensors")
    base = safetensors.torch.load_file(tiny_model / "model.safetensors")
    merged = safetensors.torch.load_file(stages / "merged" / "model.safetensors")
    # stage 1 kept the emulator frozen (shallow layers 1 and 2 are base layers 1 and 3) and it differs from the base's
    for name, tensor in distilled.items():
        index = {"1": "1", "3": "2"}[name.split(".")[2]]
        own = name.replace(f"layers.{name.split('.')[2]}.", f"layers.{index}.")
        assert torch.equal(stage1[own], tensor.to(stage1[own].dtype))
    assert any(not torch.equal(base[name], tensor.to(base[name].dtype)) for name, tensor in distilled.items())
    # the write-back changed the trained layers 0 and 4 only
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and {name.split(".")[2] for name in changed} == {"0", "4"}


def test_the_cost_model_counts_the_distillation(tiny_model, corpora):
    plain = study_runner.elo_plan(pipeline.resolve_defaults(tiny_run_config(tiny_model, corpora, "stage1.bridge_tokens=0")))
    emulated = study_runner.elo_plan(pipeline.resolve_defaults(tiny_run_config(
        tiny_model, corpora, "stage1.emulator_layers=2", "stage1.emulator_tokens=512")))
    shape = study_runner._shape(pipeline.resolve_defaults(tiny_run_config(tiny_model, corpora)))
    per_token = costmodel.emulator_flops_per_token(shape, [0, 4], (0, 4), [1, 3])
    active = shape.layer_active_params
    assert per_token == 2 * sum(map(active, range(4))) + 2 * active(0) + 6 * (active(1) + active(3))
    stage1_extra = 1600 * 4 * (active(1) + active(3))  # stage 1 runs the frozen emulator forward, and backward to layer 0
    assert emulated["flops"] - plain["flops"] == pytest.approx(512 * per_token + stage1_extra)
