"""YAML + key=value configuration: typing, unknown keys, validation."""

from __future__ import annotations

import pytest

from elo_cpt import config
from elo_cpt.errors import EloError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("layers: 0,15,-1\nstage1:\n  lr: 1e-5\n  tokens: 1000\ndata:\n  eval: {de: a.txt}\n")
    cfg = config.load_config(path, ["stage1.lr=2e-5", "seq_len=128", "data.target=[x.jsonl, y.jsonl]", "model=m"])
    assert cfg.layers == "0,15,-1" and cfg.stage1.lr == 2e-5 and cfg.stage1.tokens == 1000
    assert cfg.seq_len == 128 and cfg.data.target == ["x.jsonl", "y.jsonl"] and cfg.model == "m"
    assert cfg.data.eval == {"de": "a.txt"}
    assert config.load_config(None, ["layers=0"]).layers == "0"  # YAML reads 0 as int; the key wants a string
    assert config.load_config(None, ["align.tokens=null"]).align.tokens is None


def test_bridge_tokens_auto_scales_with_the_width():
    assert config.load_config(None, ["stage1.bridge_tokens=auto"]).stage1.bridge_tokens == "auto"
    assert config.load_config(None, ["stage1.bridge_tokens=8192"]).stage1.bridge_tokens == 8192
    # auto: 4x the hidden size (each output of the fit has hidden + 1 unknowns), never under 4,096
    assert config.bridge_token_count("auto", 576) == 4096 and config.bridge_token_count("auto", 4096) == 16384
    assert config.bridge_token_count(1000, 4096) == 1000 and config.bridge_token_count(0, 576) == 0


@pytest.mark.parametrize(
    "override, message",
    [("stage1.lrr=1", "unknown config key 'stage1.lrr'"), ("colour=red", "unknown config key"), ("seq_len=abc", "expects int"),
     ("stage1=3", "is a section"), ("seq_len", "key=value"), ("stage1.lr=-1", "positive"), ("data.english_share=1.5", "english_share"),
     ("stage1.bridge_tokens=-1", "bridge_tokens must be a token count"), ("stage1.bridge_tokens=lots", "or auto, not 'lots'"),
     ("stage1.bridge_tokens=true", "expects int or str")],
)
def test_bad_overrides(override, message):
    with pytest.raises(EloError, match=message):
        config.load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(EloError, match="does not exist"):
        config.load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(EloError, match="mapping"):
        config.load_config(tmp_path / "list.yaml")


def test_every_setting_is_documented():
    rows = config.describe()
    assert {"stage1.lr", "align.token_ratio", "data.english_share", "layers"} <= {key for key, _, _ in rows}
    assert all(doc for _, _, doc in rows)


def test_the_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = config.load_config(path)
        assert cfg.stage1.precision == cfg.align.precision == "bf16-mixed"


@pytest.mark.parametrize("override,message", [
    ("stage1.precision=fp8", "stage1.precision must be one of auto, 32-true, bf16-mixed, bf16-true"),
    ("align.precision=bf16-true", "align.precision bf16-true needs optimizer adamw_kahan"),
    ("stage1.optimizer=sgd", "stage1.optimizer must be one of"),
    ("stage1.tokens=0", "stage1.tokens must be >= 1"),
])
def test_bad_precision_and_optimizer(override, message):
    with pytest.raises(EloError, match=message):
        config.load_config(None, [override])
    assert config.load_config(None, ["align.tokens=0"]).align.tokens == 0  # no alignment is allowed


def test_differences_name_each_changed_setting():
    old = config.to_dict(config.load_config(None, ["stage1.lr=1e-5"]))
    new = config.to_dict(config.load_config(None, ["stage1.lr=2e-5", "data.eval={de: a.txt}"]))
    assert config.differences(old, new) == ["data.eval: {} -> {'de': 'a.txt'}", "stage1.lr: 1e-05 -> 2e-05"]
    assert config.differences(old, old) == []
