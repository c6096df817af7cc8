"""The `elo` command as a user runs it: each stage as a subcommand, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TEXT
from elo_cpt import checkpoint, cli


def elo(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "elo_cpt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_stage_by_stage(tiny_model, corpora, tmp_path):
    steps = [
        ("detach", tiny_model, "--layers", "0,-1", "--out", tmp_path / "shallow"),
        ("bridge", tmp_path / "shallow", "--data", corpora["train_de"], "--tokens", 320, "--seq-len", 32),
        ("pretrain", tmp_path / "shallow", "--data", corpora["train_de"], "--data", f"{corpora['train_en']}@0.1",
         "--tokens", 640, "--seq-len", 32, "--lr", 1e-3, "--out", tmp_path / "stage1"),
        ("merge", tiny_model, tmp_path / "stage1", "--out", tmp_path / "merged"),
        ("align", tmp_path / "merged", "--data", corpora["train_de"], "--seq-len", 32, "--out", tmp_path / "aligned"),
        ("eval", tmp_path / "aligned", "--text", f"de={TEXT / 'de.txt'}", "--text", f"en={TEXT / 'en.txt'}",
         "--json", tmp_path / "eval.json"),
    ]
    for step in steps:
        result = elo(*step)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "bits/char" in result.stdout and (tmp_path / "eval.json").is_file()
    assert (tmp_path / "shallow" / "elo_bridges.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (("detach", "{tmp}/missing", "--layers", "0,-1", "--out", "{tmp}/out"), "does not exist"),
        (("detach", "{model}", "--layers", "0,12", "--out", "{tmp}/out"), "out of range"),
        (("pretrain", "{model}", "--data", "{tmp}/empty.txt", "--out", "{tmp}/out"), "has no elo_provenance.json"),
        (("align", "{model}", "--data", "{tmp}/empty.txt", "--out", "{tmp}/out"), "is empty"),
        (("bridge", "{model}", "--data", "{tmp}/empty.txt"), "has no elo_provenance.json"),
        (("bridge", "{model}", "--data", "{tmp}/empty.txt", "--tokens", "lots"), "whole number of tokens or auto"),
        (("run", "stage1.lrr=1", "--out", "{tmp}/out"), "unknown config key"),
        (("run", "{tmp}/missing.yaml", "--out", "{tmp}/out"), "does not exist"),
        (("eval", "{model}", "--text", "de", "--json", "{tmp}/out"), "bad --text 'de'; write LANG=PATH"),
    ],
)
def test_bad_input_gives_one_line_error_and_no_output(tiny_model, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    result = elo(*(a.format(tmp=tmp_path, model=tiny_model) for a in args))
    assert result.returncode == 1, result.stderr[-2000:]  # our error, not argparse's usage error (2)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("elo: error:") and message in lines[-1], result.stderr[-2000:]
    assert not any(line.startswith("Traceback") for line in lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_show_config_lists_documented_keys():
    result = elo("run", "--show-config")
    assert result.returncode == 0 and "stage1.lr = 1.5e-05" in result.stdout
    assert "align.tokens = None\n    Alignment tokens; None takes token_ratio x stage1.tokens." in result.stdout
    result = elo("run", "stage1.lr=1e-5", "--show-config")
    assert result.returncode == 0 and "stage1.lr = 1e-05" in result.stdout


@pytest.mark.parametrize("spec", ["-2:", "-1,3", "-1", "-3:-1", "0,-1"])
def test_layer_specs_starting_with_a_minus_parse_as_typed(spec):
    parser = cli.build_parser()
    detach = parser.parse_args(["detach", "M", "--layers", spec, "--frozen-layers", spec, "--out", "X"])
    assert (detach.layers, detach.frozen_layers, detach.out) == (spec, spec, "X")
    finetune = parser.parse_args(["finetune", "M", "--data", "d.txt", "--method", "freeze", "--layers", spec, "--out", "X"])
    assert (finetune.layers, finetune.method, finetune.out) == (spec, "freeze", "X")
    assert parser.parse_args(["bench", "M", "--layers", spec, "--steps", "2"]).layers == spec
    assert parser.parse_args(["detach", "M", f"--layers={spec}", "--out", "X"]).layers == spec  # the form that always worked
    # A missing value is still an error, not an option swallowed as a spec.
    with pytest.raises(SystemExit):
        parser.parse_args(["detach", "M", "--layers", "--out", "X"])


def test_elo_detach_with_a_negative_range(tiny_model, tmp_path, capsys):
    assert cli.main(["detach", str(tiny_model), "--layers", "-2:", "--frozen-layers", "-4,-3", "--out", str(tmp_path / "shallow")]) == 0
    provenance = json.loads((tmp_path / "shallow" / checkpoint.PROVENANCE).read_text())
    assert provenance["layers"] == [1, 2, 3, 4] and provenance["trained_layers"] == [3, 4]


def test_bench_takes_the_training_commands_option_names():
    parser = cli.build_parser()
    for flags in (["--batch-size", "2", "--seq-len", "8"], ["--batch", "2", "--seq", "8"]):
        args = parser.parse_args(["bench", "smollm2-135m", *flags])
        assert (args.batch, args.seq) == (2, 8)
