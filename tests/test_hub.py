"""Models named by hub id, without the network: a Hugging Face cache folder laid out as the hub client lays it out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from conftest import save_tiny_model
from elo_cpt import checkpoint, cli, hub, surgery

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, source: Path, with_shards: bool = True) -> Path:
    """Lay `source` out in `cache` as the hub client does: refs/main names the commit, snapshots/COMMIT holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot, ignore=None if with_shards else shutil.ignore_patterns("model-*.safetensors"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.chdir(tmp_path)  # so `org/...` is not a local path
    return folder


def test_a_cached_hub_id_works_offline(cache, tiny_model, tmp_path, capsys):
    assert constants.HF_HUB_OFFLINE
    snapshot = cache_model(cache, "org/tiny", tiny_model)
    assert cli.main(["detach", "org/tiny", "--layers", "0,-1", "--out", str(tmp_path / "shallow")]) == 0
    assert checkpoint.read_provenance(tmp_path / "shallow")["base_model"] == str(snapshot.resolve())
    assert (tmp_path / "shallow" / "tokenizer.json").is_file()
    assert cli.main(["detach", f"org/tiny@{COMMIT}", "--layers", "0", "--out", str(tmp_path / "shallow-rev")]) == 0
    assert cli.main(["merge", "org/tiny", str(tmp_path / "shallow"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_an_uncached_hub_id_is_one_line_and_writes_nothing(cache, tmp_path, capsys):
    assert cli.main(["detach", "org/missing", "--out", str(tmp_path / "shallow")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "org/missing is not in the Hugging Face cache" in error and "HF_HUB_OFFLINE=1" in error
    assert not (tmp_path / "shallow").exists()


def test_a_missing_local_folder_is_not_taken_for_a_hub_id(cache, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert cli.main(["detach", "runs/model", "--out", str(tmp_path / "shallow")]) == 1
    assert "model folder runs/model does not exist" in capsys.readouterr().err
    assert not hub.is_hub_id("runs/model") and hub.is_hub_id("org/name@v1.0") and not hub.is_hub_id("/abs/path")


def test_detach_fetches_only_the_shards_it_reads(cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "m", num_layers=6)).save_pretrained(sharded, max_shard_size="60KB")
    checkpoint.copy_side_files(tmp_path / "m", sharded, skip=("config.json",))
    weight_map = json.loads((sharded / checkpoint.SAFETENSORS_INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 4
    snapshot = cache_model(cache, "org/sharded", sharded, with_shards=False)
    fetched = []

    def fake_download(repo_id, filename, revision=None, **_):  # the hub, served from the local copy
        assert (repo_id, revision) == ("org/sharded", COMMIT)
        fetched.append(filename)
        shutil.copy(sharded / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    surgery.detach("org/sharded", "0,-1", tmp_path / "shallow")
    needed = {shard for name, shard in weight_map.items() if not name.startswith("model.layers.")
              or name.split(".")[2] in ("0", "5")}
    assert set(fetched) == needed and len(needed) < len(set(weight_map.values()))
    surgery.merge("org/sharded", tmp_path / "shallow", tmp_path / "merged")  # the write-back needs every shard
    assert set(fetched) == set(weight_map.values())


def test_elo_run_takes_a_hub_id(cache, tiny_model, corpora, tmp_path):
    from test_pipeline import tiny_run_config

    from elo_cpt import pipeline

    cache_model(cache, "org/tiny", tiny_model)
    cfg = tiny_run_config("org/tiny", corpora, "stage1.tokens=640", "eval.max_chars=2000", "eval.sample_tokens=0")
    metrics = pipeline.run(cfg, tmp_path / "run")
    assert metrics["config"]["model"] == "org/tiny"  # the config keeps the id; the cache folder is an implementation detail
    assert set(metrics["eval"]) == {"base", "merged", "final"}
