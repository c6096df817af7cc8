"""`elo vocab`: new tokens learned from Korean text, appended to a byte-level BPE; old encodings, ids and rows kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import _SMALL, TEXT, VOCAB, make_tokenizer
from elo_cpt import cli, corpus
from elo_cpt.errors import EloError
from elo_cpt.vocabulary import VOCAB_FILE, extend_vocabulary

ADD = 40
KO = TEXT / "ko.txt"


def _tiny(path: Path, tie: bool) -> Path:
    """A tiny llama with the fixture tokenizer (376 tokens + 1 special, so 7 padding rows up to VOCAB)."""
    config = AutoConfig.for_model("llama", num_hidden_layers=2, tie_word_embeddings=tie, **_SMALL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> dict[bool, tuple[Path, Path, dict]]:
    """tie -> (base folder, extended folder, summary), for a tied and an untied head."""
    root = tmp_path_factory.mktemp("vocab")
    found = {}
    for tie in (True, False):
        base = _tiny(root / f"base-{tie}", tie)
        summary = extend_vocabulary(base, [str(KO)], ADD, root / f"out-{tie}")
        found[tie] = (base, root / f"out-{tie}", summary)
    return found


def _paragraphs(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n\n")


def test_old_ids_and_ascii_encodings_unchanged(extended) -> None:
    base, out, summary = extended[True]
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    assert len(new) == len(old) + ADD and summary["first_new_id"] == VOCAB  # after the config's padding rows
    new_vocab = new.get_vocab()
    assert all(new_vocab[token] == i for token, i in old.get_vocab().items())
    assert sorted(set(new_vocab.values()) - set(old.get_vocab().values())) == list(range(VOCAB, VOCAB + ADD))
    english = [*_paragraphs(TEXT / "en.txt"), 'for f in *.txt; do cp "$f" /tmp/ && echo "$f" >> log; done\n\t{}[]~|']
    assert new(english, add_special_tokens=False)["input_ids"] == old(english, add_special_tokens=False)["input_ids"]
    strings = [old.decode([i]) for i in range(len(old))]  # every old vocabulary string, as text
    assert new(strings, add_special_tokens=False)["input_ids"] == old(strings, add_special_tokens=False)["input_ids"]
    # The default rule: no new token holds an ASCII byte, so ASCII characters keep their tokens in mixed text too.
    mixed = 'Das "cp" 명령은 파일을 복사합니다 (cp).'
    ascii_tokens = lambda tok: [t for t in tok.tokenize(mixed) if any(c.isascii() and c.isprintable() for c in t)]  # noqa: E731
    assert ascii_tokens(new) == ascii_tokens(old)


def test_target_language_needs_fewer_tokens(extended) -> None:
    base, out, summary = extended[True]
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    korean = KO.read_text(encoding="utf-8")
    before, after = len(old.encode(korean, add_special_tokens=False)), len(new.encode(korean, add_special_tokens=False))
    assert after < 0.8 * before
    documents = corpus.read_documents(KO)  # what the summary counts: per document, no separators
    chars = sum(map(len, documents))
    assert summary["characters"] == chars
    assert summary["tokens_per_char_before"] == sum(map(len, old(documents, add_special_tokens=False)["input_ids"])) / chars
    assert summary["tokens_per_char_after"] == sum(map(len, new(documents, add_special_tokens=False)["input_ids"])) / chars
    assert summary["tokens_per_char_after"] < summary["tokens_per_char_before"]
    assert new.decode(new.encode(korean, add_special_tokens=False)) == korean
    assert json.loads((out / VOCAB_FILE).read_text(encoding="utf-8"))["added"] == ADD


@pytest.mark.parametrize("tie", [True, False])
def test_new_rows_are_the_mean_of_their_pieces(extended, tie: bool) -> None:
    base, out, summary = extended[tie]
    old_weights, new_weights = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    names = ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"])
    assert set(new_weights) == set(old_weights)
    for name in old_weights:
        if name not in names:
            assert torch.equal(new_weights[name], old_weights[name]), name  # untouched tensors byte-identical
    for name in names:
        old, new = old_weights[name], new_weights[name]
        assert new.shape == (VOCAB + ADD, old.shape[1]) and new.dtype == old.dtype
        assert torch.equal(new[:VOCAB], old)  # old rows, padding rows included, byte-identical
        for entry in summary["new_tokens"]:
            assert len(entry["pieces"]) >= 2 and max(entry["pieces"]) < VOCAB
            assert torch.allclose(new[entry["id"]], old[entry["pieces"]].mean(0), atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == VOCAB + ADD and summary["tied_head"] == tie
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tie


def test_extended_model_round_trips_and_generates(extended) -> None:
    _, out, _ = extended[False]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("할머니는 일요일마다", return_tensors="pt")["input_ids"]
    assert ids.max() >= VOCAB  # a new token
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4) and generated.max() < VOCAB + ADD
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_cli_prints_a_summary(tmp_path, capsys) -> None:
    base = _tiny(tmp_path / "base", tie=True)
    assert cli.main(["vocab", str(base), "--data", str(KO), "--add", "10", "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.strip()
    assert "10 new tokens, vocabulary 394" in line and "->" in line and "\n" not in line
    assert (tmp_path / "out" / VOCAB_FILE).is_file()


def _refused(tmp_path: Path, base: Path, add: int, match: str) -> None:
    with pytest.raises(EloError, match=match) as error:
        extend_vocabulary(base, [str(KO)], add, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("add", [0, -3])
def test_refuses_no_new_tokens(tmp_path, add: int) -> None:
    _refused(tmp_path, tmp_path / "never-read", add, "--add must be a positive number")


def test_refuses_a_corpus_too_small(tmp_path) -> None:
    base = _tiny(tmp_path / "base", tie=True)
    _refused(tmp_path, base, 100_000, r"too small to learn 100,000 new tokens: it yields only [\d,]+ merges")


def test_refuses_a_tokenizer_that_is_not_byte_level_bpe(tmp_path) -> None:
    base = _tiny(tmp_path / "base", tie=True)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(KO.read_text(encoding="utf-8").split())))}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(base)
    _refused(tmp_path, base, 10, "supports only byte-level BPE tokenizers")


@pytest.mark.slow
def test_korean_demo_corpus_on_smollm2(tmp_path) -> None:
    """The issue's goal on the real default: at least 3x fewer tokens per held-out Korean character, English kept."""
    from elo_cpt.demo.assets import prepare_assets, prepare_language

    ko, base = prepare_language("ko"), prepare_assets().model
    summary = extend_vocabulary(base, [str(ko.train)], 8000, tmp_path / "out")
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(tmp_path / "out")
    held_out = corpus.read_documents(ko.eval)
    count = lambda tok, docs: sum(map(len, tok(docs, add_special_tokens=False)["input_ids"]))  # noqa: E731
    assert count(new, held_out) * 3 <= count(old, held_out)
    english = corpus.read_documents(ko.eval_english)
    assert new(english, add_special_tokens=False)["input_ids"] == old(english, add_special_tokens=False)["input_ids"]
    assert summary["tokens_per_char_after"] * 3 <= summary["tokens_per_char_before"]


def _naive_merges(words: dict[tuple[str, ...], int], add: int, known: set[str], ascii_context: bool) -> list[tuple[str, str]]:
    """The same rule, recounting every pair after each merge: what the incremental algorithm must reproduce."""
    from collections import Counter

    from elo_cpt.vocabulary import MIN_PAIR_COUNT, _ascii_free

    seqs, merges = {tuple(w): n for w, n in words.items()}, []
    while len(merges) < add:
        counts: Counter = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += n
        allowed = [(-n, p) for p, n in counts.items()
                   if n >= MIN_PAIR_COUNT and p[0] + p[1] not in known and _ascii_free(p[0] + p[1], ascii_context)]
        if not allowed:
            break
        pair = min(allowed)[1]
        merges.append(pair)
        known.add(pair[0] + pair[1])
        merged: dict = {}
        for seq, n in seqs.items():
            out, j = [], 0
            while j < len(seq):
                if seq[j:j + 2] == pair:
                    out.append(pair[0] + pair[1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        seqs = merged
    return merges


@pytest.mark.parametrize("ascii_context", [False, True])
def test_incremental_merges_match_recounting(ascii_context: bool) -> None:
    from collections import Counter

    from elo_cpt.vocabulary import count_words, learn_merges

    tokenizer = make_tokenizer()
    words, _ = count_words(tokenizer, corpus.read_documents(KO) + corpus.read_documents(TEXT / "de.txt"))
    segmented: Counter = Counter()
    for word, n in words.items():
        segmented[tuple(t.value for t in tokenizer.backend_tokenizer.model.tokenize(word))] += n
    known = set(tokenizer.get_vocab())
    expected = _naive_merges(segmented, 10_000, set(known), ascii_context)
    assert len(expected) > ADD
    assert learn_merges(segmented, 10_000, set(known), ascii_context) == expected


def test_ascii_context_joins_the_leading_space(tmp_path, extended) -> None:
    base = _tiny(tmp_path / "base", tie=True)
    summary = extend_vocabulary(base, [str(KO)], ADD, tmp_path / "out", ascii_context=True)
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(tmp_path / "out")
    assert any(entry["token"].startswith("Ġ") for entry in summary["new_tokens"])  # " 명령" as one token
    english = _paragraphs(TEXT / "en.txt")
    assert new(english, add_special_tokens=False)["input_ids"] == old(english, add_special_tokens=False)["input_ids"]
    assert summary["ascii_context"] is True
    assert summary["tokens_per_char_after"] < extended[True][2]["tokens_per_char_after"]  # fewer than the default rule


@pytest.mark.parametrize("tie", [True, False])
def test_extended_model_detaches_and_merges_back(extended, tmp_path, tie: bool) -> None:
    """ELO's surgery on an extended model: the shallow model keeps the new rows, and writing it back untrained
    gives the extended model byte for byte (training the new rows in it is not done yet: docs/vocab.md)."""
    from elo_cpt.surgery import detach, merge

    _, out, _ = extended[tie]
    detach(out, "0,-1", tmp_path / "shallow")
    shallow = load_file(tmp_path / "shallow" / "model.safetensors")
    assert shallow["model.embed_tokens.weight"].shape[0] == VOCAB + ADD
    merge(out, tmp_path / "shallow", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == AutoTokenizer.from_pretrained(out).get_vocab()
