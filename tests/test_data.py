"""Corpus reading, byte-share mixing, disjoint splits and packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEXT
from elo_cpt import corpus, data
from elo_cpt.errors import EloError


def test_source_spec():
    assert corpus.Source.parse("a/b.jsonl@0.9") == corpus.Source(Path("a/b.jsonl"), 0.9)
    assert corpus.Source.parse("c.txt").weight == 1.0
    with pytest.raises(EloError, match="weight"):
        corpus.Source.parse("c.txt@x")
    with pytest.raises(EloError, match="positive"):
        corpus.Source.parse("c.txt@0")


def test_read_documents_txt_and_jsonl(tmp_path):
    assert len(corpus.read_documents(TEXT / "de.txt")) == 12
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "eins"}\n\n{"text": "zwei"}\n')
    assert corpus.read_documents(jsonl) == ["eins", "zwei"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"  \n\n ", "empty"), (b'{"txt": "a"}\n', "no string field"), (b"{oops\n", "not valid JSON")],
)
def test_bad_corpora(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(EloError, match=message):
        corpus.read_documents(path)
    with pytest.raises(EloError, match="does not exist"):
        corpus.read_documents(tmp_path / "missing.txt")


def test_split_is_disjoint_and_takes_the_tail():
    documents = [f"d{i}" for i in range(50)]
    head, tail = data.split_documents(documents, 0.1)
    assert head == documents[:45] and tail == documents[45:]
    head, tail = data.split_documents(["a", "b", "c", "a", "d"], 0.4)
    assert head == ["a", "b", "c"] and tail == ["d"]


@pytest.mark.parametrize("english_share", [0.1, 0.3, 0.5])
def test_mix_gives_exact_byte_shares_and_the_token_budget(tokenizer, english_share):
    # Long target documents next to short English ones: taking whole documents would miss the share.
    target = [" ".join(f"Ein deutscher Satz Nummer {i}-{j} mit etwas Text." for j in range(300)) for i in range(60)]
    english = [f"English sentence {i}." for i in range(20000)]
    weights = [1 - english_share, english_share]
    mixture = data.mix_documents([target, english], weights, tokenizer, n_tokens=30_000)
    byte_counts = [sum(len(d.encode()) for i, d in mixture if i == which) for which in (0, 1)]
    assert byte_counts[1] / sum(byte_counts) == pytest.approx(english_share, abs=0.002)
    tokens = sum(len(ids) + 1 for ids in tokenizer([d for _, d in mixture], add_special_tokens=False)["input_ids"])
    assert 30_000 <= tokens < 30_000 * 1.05
    assert mixture == data.mix_documents([target, english], weights, tokenizer, n_tokens=30_000)
    # Interleaved: the English share is reached early, not only at the end.
    first_tenth = mixture[: len(mixture) // 10]
    assert any(i == 1 for i, _ in first_tenth) and any(i == 0 for i, _ in first_tenth)


def test_mix_runs_out_of_text(tokenizer):
    with pytest.raises(EloError, match="too little text"):
        data.mix_documents([["kurz"], ["short"]], [0.5, 0.5], tokenizer, n_tokens=10_000)


def test_pack_rows_and_separators(tokenizer):
    documents = ["a b c", "d e f"] * 50
    rows = data.pack(documents, tokenizer, seq_len=16)
    assert rows.shape[1] == 16
    # Each document's tokens, then the separator (eos), joined and cut into whole rows; the remainder is dropped.
    ids = [t for d in documents for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert rows.tolist() == [ids[i : i + 16] for i in range(0, len(ids) // 16 * 16, 16)]
    with pytest.raises(EloError, match="less than one sequence"):
        data.pack(["a"], tokenizer, seq_len=64)


def test_load_training_data_with_budget(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in corpus.read_documents(TEXT / "de.txt") * 5))
    dataset = data.load_training_data([str(path)], tokenizer, seq_len=32, n_tokens=320, cache_dir=tmp_path / "cache")
    assert len(dataset) == 10
    assert dataset[0]["input_ids"].equal(dataset[0]["labels"])


def test_single_source_budget_stops_early_and_too_small_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text((TEXT / "de.txt").read_text())
    for cache in (tmp_path / "cache", None):
        assert len(data.load_training_data([str(path)], tokenizer, seq_len=16, n_tokens=64, cache_dir=cache)) == 4
        with pytest.raises(EloError, match="fewer than"):
            data.load_training_data([str(path)], tokenizer, seq_len=16, n_tokens=100_000, cache_dir=cache)


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Grüße aus Köln\n\nzweites Dokument".encode("latin-1"))
    assert corpus.read_documents(path) == ["Gr\ufffd\ufffde aus K\ufffdln", "zweites Dokument"]
    assert "3 invalid UTF-8" in capsys.readouterr().err


def test_folders_globs_fields_parquet_and_saved_datasets(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("eins\n\nzwei")
    (folder / "sub" / "b.jsonl").write_text('{"content": "drei"}\n')
    (folder / "ignored.md").write_text("nicht")
    with pytest.raises(EloError, match="name the field"):
        corpus.read_documents(folder)
    (folder / "sub" / "b.jsonl").write_text('{"text": "drei"}\n')
    assert corpus.read_documents(folder) == ["eins", "zwei", "drei"]
    assert corpus.read_source(f"{folder}/**/*.jsonl") == ["drei"]
    assert corpus.Source.parse("x.jsonl#content@0.5") == corpus.Source(Path("x.jsonl"), 0.5, "content")
    (tmp_path / "c.jsonl").write_text('{"content": "vier", "text": 5}\n')
    assert corpus.read_source(f"{tmp_path}/c.jsonl#content") == ["vier"]
    with pytest.raises(EloError, match="no .txt, .jsonl or .parquet file matches"):
        corpus.read_source(f"{tmp_path}/*.csv")

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["fünf", "sechs"]}), tmp_path / "d.parquet")
    assert corpus.read_source(f"{tmp_path}/d.parquet#body") == ["fünf", "sechs"]
    with pytest.raises(EloError, match="has no column 'text'"):
        corpus.read_documents(tmp_path / "d.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(EloError, match="cannot read Parquet file"):
        corpus.read_documents(tmp_path / "broken.parquet")
    datasets.Dataset.from_dict({"text": ["sieben", "acht"]}).save_to_disk(str(tmp_path / "saved"))
    assert corpus.read_documents(tmp_path / "saved") == ["sieben", "acht"]
