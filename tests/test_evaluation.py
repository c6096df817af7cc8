"""Bits per character, checked against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TEXT, VOCAB
from elo_cpt import evaluation
from elo_cpt.errors import EloError


def uniform_model(tiny_model):
    """A model whose head outputs zeros: every token costs exactly ln(VOCAB) nats."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


@pytest.mark.parametrize("seq_len", [7, 32, 4096])
def test_bits_per_char_hand_computed(tiny_model, tokenizer, seq_len):
    text = "Grüße aus Köln, und viele Grüße zurück!"
    result = evaluation.bits_per_char(uniform_model(tiny_model), tokenizer, text, seq_len=seq_len, batch_size=3)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert result["tokens"] == n_tokens
    assert result["bits_per_char"] == pytest.approx(n_tokens * math.log2(VOCAB) / len(text), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(n_tokens * math.log2(VOCAB) / len(text.encode()), rel=1e-5)


def test_windowing_does_not_change_the_total_much(tiny_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = (TEXT / "de.txt").read_text()
    # Every token is predicted once whatever the window; only the context length differs.
    short, long = (evaluation.bits_per_char(model, tokenizer, text, seq_len=s)["bits_per_char"] for s in (64, 512))
    assert short == pytest.approx(long, rel=0.05)


def test_evaluate_model_folder_and_errors(tiny_model, tmp_path):
    results = evaluation.evaluate(tiny_model, {"de": TEXT / "de.txt", "en": TEXT / "en.txt"}, seq_len=64, max_chars=500)
    # The whole paragraphs that fit in 500 characters.
    assert {lang: r["chars"] for lang, r in results.items()} == {"de": 352, "en": 497}
    assert [(TEXT / f"{lang}.txt").read_text()[n : n + 2] for lang, n in (("de", 352), ("en", 497))] == ["\n\n", "\n\n"]
    assert 0 < results["de"]["bits_per_char"] < 20
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(EloError, match="empty"):
        evaluation.evaluate(tiny_model, {"de": tmp_path / "empty.txt"})
    with pytest.raises(EloError, match="LANG=PATH"):
        evaluation.parse_texts(["de.txt"])
