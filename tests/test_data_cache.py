"""The tokenized cache, streaming reads, the held-out overlap check and the remaining bad inputs."""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import TEXT
from elo_cpt import corpus as corpus_mod, data, tokencache
from elo_cpt.errors import EloError


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    documents = corpus_mod.read_documents(TEXT / "de.txt") * 6
    path.write_text("".join(json.dumps({"text": f"{i}: {d}"}) + "\n" for i, d in enumerate(documents)))
    return path


@pytest.fixture
def calls(monkeypatch, tokenizer):
    """How many times any fast tokenizer was called to encode text."""
    counter = {"n": 0}
    original = type(tokenizer).__call__

    def spy(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    return counter


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_second_load_reads_the_cache_and_tokenizes_nothing(tmp_path, corpus, tokenizer, calls):
    cache = tmp_path / "cache"
    first = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=cache)
    assert calls["n"] > 0
    assert isinstance(first.rows, np.memmap) and len(first) == 20
    calls["n"] = 0
    second = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=cache)
    assert calls["n"] == 0
    assert all(first[i]["input_ids"].equal(second[i]["input_ids"]) for i in range(len(first)))
    # The cached rows are the rows packing in memory gives.
    uncached = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=False)
    assert isinstance(uncached.rows, torch.Tensor)
    assert torch.stack([second[i]["input_ids"] for i in range(len(second))]).equal(uncached.rows)
    assert second[0]["input_ids"].dtype == torch.long
    [meta] = [p for p in cache.iterdir() if p.suffix == ".json"]
    info = json.loads(meta.read_text())
    assert info["rows"] == 20 and info["seq_len"] == 32 and info["sources"][0]["path"] == str(corpus)
    # The same content under another name is the same entry.
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(corpus, moved)
    calls["n"] = 0
    data.load_training_data([str(moved)], tokenizer, seq_len=32, n_tokens=640, cache_dir=cache)
    assert calls["n"] == 0


def test_content_seq_len_budget_and_tokenizer_make_new_entries(tmp_path, corpus, tokenizer, calls):
    cache = tmp_path / "cache"

    def load(tok=tokenizer, seq_len=32, n_tokens=640):
        calls["n"] = 0
        data.load_training_data([str(corpus)], tok, seq_len=seq_len, n_tokens=n_tokens, cache_dir=cache)
        return calls["n"]

    assert load() > 0 and load() == 0
    assert load(seq_len=16) > 0 and load(seq_len=16) == 0
    assert load(n_tokens=320) > 0
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["Donaudampfschiff"])
    assert load(tok=other) > 0 and load(tok=other) == 0
    corpus.write_text(corpus.read_text() + json.dumps({"text": "ein neues Dokument"}) + "\n")
    assert load() > 0
    assert len([p for p in cache.iterdir() if p.suffix == ".json"]) == 5
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_folder_mixture_and_field_are_part_of_the_key(tmp_path, tokenizer, calls):
    folder = tmp_path / "de"
    folder.mkdir()
    (folder / "a.txt").write_text((TEXT / "de.txt").read_text())
    (tmp_path / "en.txt").write_text((TEXT / "en.txt").read_text() * 20)
    cache = tmp_path / "cache"

    def load(*sources):
        calls["n"] = 0
        data.load_training_data(list(sources), tokenizer, seq_len=16, n_tokens=160, cache_dir=cache)
        return calls["n"]

    en = str(tmp_path / "en.txt")
    assert load(f"{folder}@0.5", f"{en}@0.5") > 0 and load(f"{folder}@0.5", f"{en}@0.5") == 0
    assert load(f"{folder}@1", f"{en}@1") == 0  # weights are normalised: 1:1 is 0.5:0.5
    assert load(f"{folder}@0.8", f"{en}@0.2") > 0
    before = corpus_mod.source_digest(str(folder))
    (folder / "a.txt").rename(folder / "b.txt")  # a folder's digest covers the file names inside it
    assert corpus_mod.source_digest(str(folder)) != before
    assert corpus_mod.source_digest(f"{folder}/*.txt") == corpus_mod.source_digest(str(folder))


def test_half_written_entries_are_ignored(tmp_path, corpus, tokenizer, calls):
    cache = tmp_path / "cache"
    source = corpus_mod.Source.parse(str(corpus))
    key, _ = tokencache.cache_key([source], tokenizer, data.separator_id(tokenizer), 32, 640)
    cache.mkdir()
    # A crash while writing the rows leaves a temporary file; one after renaming them, a .bin without its .json.
    (cache / f".{key}.999.bin.tmp").write_bytes(b"\0" * 100)
    (cache / f"{key}.bin").write_bytes(b"\0" * 100)
    dataset = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=cache)
    assert calls["n"] > 0 and int(dataset[0]["input_ids"].sum()) > 0
    # A .bin cut short after its .json was written (a damaged disk) is not trusted either.
    with (cache / f"{key}.bin").open("r+b") as f:
        f.truncate(64)
    calls["n"] = 0
    dataset = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=cache)
    assert calls["n"] > 0 and len(dataset) == 20


def test_an_interrupted_build_leaves_nothing(tmp_path, corpus, tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 10)
    original = type(tokenizer).__call__
    seen = {"n": 0}

    def interrupted(self, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_training_data([str(corpus)], tokenizer, seq_len=8, cache_dir=cache)
    assert entries(cache) == []


def test_default_cache_location_and_disabling(tmp_path, corpus, tokenizer, monkeypatch):
    monkeypatch.setenv("ELO_CPT_TOKEN_CACHE", str(tmp_path / "own"))
    assert tokencache.token_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("ELO_CPT_TOKEN_CACHE")
    monkeypatch.setenv("ELO_CPT_CACHE", str(tmp_path / "root"))
    assert tokencache.token_cache_dir() == tmp_path / "root" / "tokens"
    data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=320)
    assert len(entries(tmp_path / "root" / "tokens")) == 2
    for off in (None, False):
        data.load_training_data([str(corpus)], tokenizer, seq_len=16, n_tokens=320, cache_dir=off)
    assert len(entries(tmp_path / "root" / "tokens")) == 2


def test_shuffling_permutes_indices_and_pickles_as_a_file(tmp_path, corpus, tokenizer):
    dataset = data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=640, cache_dir=tmp_path / "c")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    shuffled = dataset.shuffled(order)
    assert shuffled.rows is dataset.rows and shuffled.seq_len == 32 and len(shuffled) == len(dataset)
    assert all(shuffled[i]["input_ids"].equal(dataset[int(order[i])]["input_ids"]) for i in range(len(dataset)))
    twice = shuffled.shuffled(order)
    assert twice[0]["input_ids"].equal(dataset[int(order[order[0]])]["input_ids"])
    blob = pickle.dumps(shuffled)
    assert len(blob) < 2000  # the path of the memory map, not its rows
    restored = pickle.loads(blob)
    assert isinstance(restored.rows, np.memmap) and restored[3]["input_ids"].equal(shuffled[3]["input_ids"])
    in_memory = data.PackedDataset(data.pack(["a b c d"] * 40, tokenizer, 8)).shuffled(torch.arange(3))
    assert len(in_memory) == 3 and in_memory.seq_len == 8


def test_single_source_is_streamed(tmp_path, corpus, tokenizer, monkeypatch):
    # A budget met early never reads (or parses) the rest of the file.
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 10)
    with corpus.open("a") as f:
        f.write("{broken\n")
    assert isinstance(corpus_mod.iter_documents(corpus), type(x for x in ()))
    assert len(data.load_training_data([str(corpus)], tokenizer, seq_len=32, n_tokens=320, cache_dir=tmp_path / "c")) == 10
    with pytest.raises(EloError, match="not valid JSON"):
        data.load_training_data([str(corpus)], tokenizer, seq_len=32, cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


def test_parquet_and_saved_dataset_stream_in_batches(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(data, "TOKENIZE_BATCH", 3)
    rows = [f"Zeile {i}" for i in range(10)] + [None]
    pq.write_table(pa.table({"body": rows}), tmp_path / "d.parquet", row_group_size=4)
    assert corpus_mod.read_source(f"{tmp_path}/d.parquet#body") == rows[:10]
    datasets.Dataset.from_dict({"text": rows[:10]}).save_to_disk(str(tmp_path / "saved"))
    assert corpus_mod.read_documents(tmp_path / "saved") == rows[:10]


# ---------------------------------------------------------------- held-out overlap


EVAL = """Dieser Absatz steht nur in der Evaluation und nirgends sonst im Trainingstext.

Dieser Absatz steht auch im Training, mit anderen Zeilenumbrüchen dort.

Kurz.

Eine lange Zeile, die im Training als eigene Zeile vorkommt, Wort für Wort.
Und eine zweite Zeile desselben Absatzes, die nur hier steht, gar nicht dort."""


def test_overlap_counts_held_out_paragraphs_found_in_training(capsys):
    train = [
        "Anderer Text.\n\nDieser Absatz steht auch im Training,\nmit anderen   Zeilenumbrüchen dort.\n\nMehr Text.",
        "Kurz.\n\nVorher.\nEine lange Zeile, die im Training als eigene Zeile vorkommt, Wort für Wort.\nNachher.",
    ]
    assert data.check_no_overlap(iter(train), EVAL, name="eval-de.txt") == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: eval-de.txt: 2 of 3 paragraphs also occur in the training data") and err.count("\n") == 1
    with pytest.raises(EloError, match="eval-de.txt: 2 of 3 paragraphs"):
        data.check_no_overlap(train, EVAL, name="eval-de.txt", on_overlap="error")
    assert data.check_no_overlap(train[:1], EVAL, on_overlap="ignore") == 1
    assert capsys.readouterr().err == ""
    # Short paragraphs ("Kurz.") and text only in the held-out set do not count; case matters.
    assert data.check_no_overlap(["kurz.", EVAL.upper()], EVAL, on_overlap="error") == 0
    with pytest.raises(ValueError):
        data.check_no_overlap([], EVAL, on_overlap="maybe")


def test_overlap_of_the_embedded_split_is_zero(tokenizer):
    documents = corpus_mod.read_documents(TEXT / "de.txt")
    head, tail = data.split_documents(documents, 0.25)
    assert data.check_no_overlap(head, "\n\n".join(tail), on_overlap="error") == 0
    assert data.check_no_overlap(documents, "\n\n".join(tail), on_overlap="ignore") == len(
        [d for d in tail if len(" ".join(d.split())) >= data.MIN_OVERLAP_CHARS])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("weight", ["nan", "inf", "-1", "0", "-0.0"])
def test_weights_must_be_positive_finite_numbers(weight):
    with pytest.raises(EloError, match=f"bad data source 'de.txt@{weight}'.*positive"):
        corpus_mod.Source.parse(f"de.txt@{weight}")


@pytest.mark.parametrize("weight", [float("nan"), -0.5, 0.0, float("inf")])
def test_mixing_names_the_source_with_a_bad_weight(tmp_path, tokenizer, weight):
    with pytest.raises(EloError, match=r"en\.txt: weight .* is not a positive number; weights are relative byte shares"):
        data.mix_documents([["a b"], ["c d"]], [1.0, weight], tokenizer, 10, names=["de.txt", "en.txt"])
    path = tmp_path / "en.txt"
    path.write_text("text")
    sources = [corpus_mod.Source(TEXT / "de.txt"), corpus_mod.Source(path, weight)]
    with pytest.raises(EloError, match=r"en\.txt: weight"):
        data.load_training_data(sources, tokenizer, seq_len=16, n_tokens=64, cache_dir=tmp_path / "c")
    assert corpus_mod.check_weights([9, 1], ["a", "b"]) == [0.9, 0.1]


def test_weights_without_a_budget_are_reported_as_unused(tmp_path, tokenizer, capsys):
    data.load_training_data([f"{TEXT / 'de.txt'}@0.9", f"{TEXT / 'en.txt'}@0.1"], tokenizer, seq_len=16, cache_dir=False)
    assert "weights apply only with a token budget" in capsys.readouterr().err


def test_unreadable_parquet_is_one_line_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"Dokument {i} " * 50 for i in range(200)]}), good)
    for name, content in [("garbage.parquet", b"PAR1 not really"), ("cut.parquet", good.read_bytes()[: good.stat().st_size // 2]),
                          ("empty.parquet", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EloError) as caught:
            corpus_mod.read_documents(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"cannot read Parquet file {tmp_path / name}: ") and "\n" not in message


@pytest.mark.parametrize("cache", ["folder", "default", "none"])
def test_corpus_smaller_than_one_sequence_names_the_file(tmp_path, tokenizer, monkeypatch, cache):
    """Cached (in a given folder or the default one) or not, the error names the file and leaves no cache entry;
    uncached, nothing is written to the default cache folder at all."""
    monkeypatch.setenv("ELO_CPT_TOKEN_CACHE", str(tmp_path / "c"))  # the default cache folder
    cache_dir = {"folder": tmp_path / "c", "default": True, "none": None}[cache]
    path = tmp_path / "tiny.txt"
    path.write_text("Nur ein Satz.")
    for budget in (None, 640):
        with pytest.raises(EloError, match=rf"{path}.* less than one sequence of 64; give more text or lower seq_len"):
            data.load_training_data([str(path)], tokenizer, seq_len=64, n_tokens=budget, cache_dir=cache_dir)
    if cache == "none":
        assert not (tmp_path / "c").exists()
    else:
        assert (tmp_path / "c").is_dir() and entries(tmp_path / "c") == []


def test_too_little_for_the_budget_leaves_no_cache_entry(tmp_path, tokenizer):
    with pytest.raises(EloError, match="fewer than the 6,400 asked for"):
        data.load_training_data([str(TEXT / "de.txt")], tokenizer, seq_len=64, n_tokens=6400, cache_dir=tmp_path / "c")
    assert entries(tmp_path / "c") == []


def test_tokenization_benchmark_from_the_cli(tmp_path, tokenizer, corpus):
    from elo_cpt import cli

    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", str(tmp_path / "tok"), "--data", str(corpus), "--seq", "16", "--documents", "50",
                     "--workers", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["settings"]["1 thread"]
    documents = list(corpus_mod.source_documents(str(corpus)))[:50]
    tokens = sum(len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False)["input_ids"])  # + a separator each
    assert (row["documents"], row["characters"], row["tokens"]) == (50, sum(map(len, documents)), tokens)
    assert row["tokens_per_s"] > 0
    assert row["load_warm_s"] >= 0 and row["rows"] == row["tokens"] // 16
    assert cli.main(["bench", str(tmp_path / "nothing"), "--data", str(corpus)]) == 1
