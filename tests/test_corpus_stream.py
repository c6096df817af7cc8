"""Streaming at scale: `hf:` sources read by `datasets.load_dataset`, and splitting and mixing a corpus without
holding it in memory."""

from __future__ import annotations

import functools
import itertools
import json
import tracemalloc

import pytest

from conftest import TEXT
from elo_cpt import corpus, data, tokencache
from elo_cpt.errors import EloError


@pytest.fixture
def data_folder(tmp_path):
    """A folder of JSONL shards, as a dataset repository holds them; `load_dataset(folder)` reads it offline."""
    folder = tmp_path / "hub-like"
    folder.mkdir()
    documents = corpus.read_documents(TEXT / "de.txt")
    for shard in range(2):
        (folder / f"train-{shard}.jsonl").write_text(
            "".join(json.dumps({"body": f"{shard}-{i} {d}", "n": i}) + "\n" for i, d in enumerate(documents)))
    return folder


def test_hub_source_spec():
    source = corpus.Source.parse("hf:wikimedia/wikipedia:20231101.ko#text@0.9")
    assert source.hub and source.weight == 0.9 and source.field == "text"
    assert corpus.hub_parts(source.path) == ("wikimedia/wikipedia", "20231101.ko", "train")
    assert corpus.hub_parts("hf:owner/name::validation") == ("owner/name", None, "validation")
    with pytest.raises(EloError, match="hf:NAME"):
        corpus.hub_parts("hf:")


def test_hf_source_streams_a_data_folder(data_folder):
    documents = corpus.source_documents(f"hf:{data_folder}#body")
    assert not isinstance(documents, list)
    read = list(documents)
    assert len(read) == 24 and read[0].startswith("0-0 ") and read[12].startswith("1-0 ")
    with pytest.raises(EloError, match=r"has no column 'text' \(it has body, n\)"):
        corpus.read_source(f"hf:{data_folder}")
    with pytest.raises(EloError, match="cannot read dataset .*validation"):
        corpus.read_source(f"hf:{data_folder}::validation#body")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EloError, match="need the network") as err:
        corpus.read_source("hf:elo-cpt/no-such-dataset#text")
    assert "\n" not in str(err.value)
    with pytest.raises(EloError, match="need the network"):
        corpus.source_digest("hf:elo-cpt/no-such-dataset")


def test_hf_source_is_cached_by_content(data_folder, tokenizer, tmp_path):
    spec = f"hf:{data_folder}#body"
    before = corpus.source_digest(spec)
    first = data.load_training_data([spec], tokenizer, 32, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    second = data.load_training_data([spec], tokenizer, 32, cache_dir=tmp_path / "cache")
    assert (first.rows == second.rows).all()
    with (data_folder / "train-1.jsonl").open("a") as f:
        f.write(json.dumps({"body": "ein neues Dokument"}) + "\n")
    assert corpus.source_digest(spec) != before
    key, _ = tokencache.cache_key([corpus.Source.parse(spec)], tokenizer, data.separator_id(tokenizer), 32, None)
    assert not (tmp_path / "cache" / f"{key}.json").exists()


def _split_and_mix(tmp_path, tokenizer, documents: int) -> tuple[int, int, float, tuple]:
    """Split and mix a German corpus of `documents` paragraphs with English; (peak Python bytes while doing so,
    corpus bytes, German byte share, the German split)."""
    paragraphs = corpus.read_documents(TEXT / "de.txt")
    big = tmp_path / f"de-{documents}.txt"
    big.write_text("".join(f"{i} {paragraphs[i % len(paragraphs)]}\n\n" for i in range(documents)))
    english = tmp_path / "en.txt"
    english.write_text("".join(f"{i} {p}\n\n" for i, p in enumerate(corpus.read_documents(TEXT / "en.txt") * 200)))
    tracemalloc.start()
    try:
        splits = [data.split_stream(functools.partial(corpus.source_documents, str(p)), 0.1) for p in (big, english)]
        shares = [0, 0]
        for which, document in data.mix_stream([s[0] for s in splits], [0.9, 0.1], tokenizer, 20_000):
            shares[which] += len(document.encode())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, big.stat().st_size, shares[0] / sum(shares), splits[0]


def test_split_and_mix_stream_in_memory_that_does_not_grow_with_the_corpus(tmp_path, tokenizer):
    """Four times the corpus, about the same peak: Python holds a batch of documents and 8 bytes per document for
    the split, never the corpus."""
    small_peak, small_size, _, _ = _split_and_mix(tmp_path, tokenizer, 10_000)
    peak, size, german, (head, tail) = _split_and_mix(tmp_path, tokenizer, 40_000)
    assert size > 4 * small_size * 0.95
    assert peak < small_peak + 8 * 30_000 + 1e6, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.0f} MB, {small_peak / 1e6:.1f} MB for {small_size / 1e6:.0f} MB"
    assert german == pytest.approx(0.9, abs=0.01)
    # the parts are re-readable streams, and the tail shares no document with the head
    assert not set(itertools.islice(tail(), 100)) & set(head())
