"""`elo probe`: per-layer block influence and gradient norm, the suggested layer set, and `layers: probe` in a run."""

from __future__ import annotations

import json
import math

import pytest

from elo_cpt import config, layerprobe, pipeline
from elo_cpt.cli import main
from elo_cpt.errors import EloError
from test_pipeline import tiny_run_config


def test_probe_measures_every_layer_and_suggests_k_of_them(tiny_model, corpora, tmp_path):
    out = tmp_path / "probe"
    result = layerprobe.probe(tiny_model, [str(corpora["train_de"])], [str(corpora["train_en"])], tokens=256, seq_len=32,
                              layers=3, out=out, target_language="de")
    assert [row["layer"] for row in result["layers"]] == list(range(5))
    for row in result["layers"]:
        assert set(row["block_influence"]) == set(row["grad_norm"]) == {"de", "en"}
        assert all(0 <= v <= 2 for v in row["block_influence"].values())  # 1 - cosine
        assert all(math.isfinite(v) and v > 0 for v in row["grad_norm"].values())
    assert result["tokens"] == {"de": 256, "en": 256}
    assert len(result["suggested"]) == 3 and set(result["suggested"]) <= set(range(5))
    best = sorted(range(5), key=lambda i: -result["layers"][i]["score"])[:3]
    assert result["suggested"] == sorted(best) and result["suggested_spec"] == ",".join(map(str, sorted(best)))
    assert json.loads((out / "probe.json").read_text()) == result
    assert (out / "probe.png").read_bytes().startswith(b"\x89PNG")
    # target only: the largest target gradient norms
    alone = layerprobe.probe(tiny_model, [str(corpora["train_de"])], tokens=64, seq_len=32, layers=1)
    norms = [row["grad_norm"]["target"] for row in alone["layers"]]
    assert alone["suggested"] == [norms.index(max(norms))]


def test_probe_command_prints_the_table(tiny_model, corpora, tmp_path, capsys):
    assert main(["probe", str(tiny_model), "--data", str(corpora["train_de"]), "--english", str(corpora["train_en"]),
                 "--tokens", "64", "--seq-len", "32", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 6 and "suggested layers:" in out and (tmp_path / "p" / "probe.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "16", "--seq-len", "32"], "--tokens (16) must hold at least one sequence"),
    (["--layers", "6"], "--layers must be between 1 and the model's 5 layers"),
])
def test_probe_bad_settings_are_one_line_errors(tiny_model, corpora, argv, message, capsys):
    assert main(["probe", str(tiny_model), "--data", str(corpora["train_de"]), "--tokens", "64", "--seq-len", "32", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("spec, k", [("probe", 2), ("probe:3", 3), ("0,-1", None)])
def test_probe_sizes(spec, k):
    assert config.probe_size(spec) == k


@pytest.mark.parametrize("spec", ["probe:0", "probe:x", "prober"])
def test_bad_probe_specs_are_refused(spec):
    with pytest.raises(EloError, match="probe:K with K >= 1"):
        config.load_config(None, [f"layers={spec}"])


def test_layers_probe_resolves_in_a_run(tiny_model, corpora, tmp_path):
    cfg = tiny_run_config(tiny_model, corpora, "layers=probe:3", "stage1.probe_tokens=128", "align.token_ratio=0",
                          "eval.sample_tokens=0")
    metrics = pipeline.run(cfg, tmp_path / "run")
    probed = json.loads((tmp_path / "run" / "probe" / "probe.json").read_text())
    assert len(probed["suggested"]) == 3 and probed["tokens"] == {"de": 128, "en": 128}
    provenance = json.loads((tmp_path / "run" / "stages" / "stage1" / "elo_provenance.json").read_text())
    assert provenance["trained_layers"] == probed["suggested"]
    assert metrics["config"]["layers"] == "probe:3" and metrics["config"]["probed_layers"] == probed["suggested_spec"]
    cached = layerprobe.probe_layers(pipeline.resolve_defaults(cfg), tmp_path / "run")  # read back, not measured again
    assert cached.layers == probed["suggested_spec"]
    with pytest.raises(EloError, match="asks for 9 layers of a model with 5"):
        pipeline.run(tiny_run_config(tiny_model, corpora, "layers=probe:9"), tmp_path / "other")


def test_a_study_plans_a_probed_cell_with_stand_in_layers(tiny_model, corpora):
    from elo_cpt import study_runner

    probed = study_runner.elo_plan(pipeline.resolve_defaults(tiny_run_config(tiny_model, corpora, "layers=probe:3")))
    assert probed == study_runner.elo_plan(pipeline.resolve_defaults(tiny_run_config(tiny_model, corpora, "layers=0,1,-1")))
