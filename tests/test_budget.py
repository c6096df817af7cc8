"""Defaults that fit the user's data: with stage1.tokens unset, `elo run` trains one pass over the user's corpora
(stated at the start), where the embedded demo keeps its 160,000 tokens."""

from __future__ import annotations

import json
import logging

import pytest

from elo_cpt import config, data, pipeline


def user_config(tiny_model, corpora, *extra):
    return config.load_config(None, [f"model={tiny_model}", f"data.target=[{corpora['train_de']}]",
                                     f"data.english=[{corpora['train_en']}]",
                                     f"data.eval={{de: {corpora['eval_de']}, en: {corpora['eval_en']}}}", "seq_len=32", *extra])


def test_unset_stage1_tokens_take_one_pass_over_the_users_corpora(tiny_model, corpora, tmp_path, caplog):
    cfg = user_config(tiny_model, corpora)
    assert cfg.stage1.tokens is None
    with caplog.at_level(logging.INFO, logger="elo_cpt"):
        resolved = pipeline.resolve_defaults(cfg)
    tokens = resolved.stage1.tokens
    assert tokens % 32 == 0 and f"stage 1 will train {tokens:,} tokens, one pass over the corpora" in caplog.text
    summary = pipeline.write_mixtures(resolved, tmp_path)
    assert summary["stage1"]["tokens"] == tokens and summary["align"]["tokens"] == pipeline.align_tokens(resolved)
    # One pass: the German corpus (90% of the bytes) runs out first, and nearly all of its stage-1 part is used.
    head, _ = data.split_stream(lambda: (json.loads(line)["text"] for line in corpora["train_de"].open()), 0.1)
    available = sum(len(d.encode()) for d in head())
    used = sum(len(r["text"].encode()) for r in map(json.loads, (tmp_path / "stage1.jsonl").open()) if r["lang"] == "de")
    assert 0.9 * available <= used <= available
    # Twice the budget is more than the corpora hold.
    doubled = pipeline.resolve_defaults(user_config(tiny_model, corpora, f"stage1.tokens={2 * tokens}"))
    try:
        pipeline.write_mixtures(doubled, tmp_path / "doubled")
    except Exception as err:
        assert "too little text" in str(err)
    else:
        raise AssertionError("twice one pass fitted in the corpora")


def test_a_resumed_run_keeps_the_budget_it_recorded(tiny_model, corpora, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    recorded = config.to_dict(pipeline.resolve_defaults(user_config(tiny_model, corpora)))
    recorded["stage1"]["tokens"] = 640  # as if counted on a corpus that has since grown
    pipeline.write_config(out / "config.yaml", recorded)
    assert pipeline.resolve_defaults(user_config(tiny_model, corpora), out).stage1.tokens == 640
    # other data: counted afresh
    other = user_config(tiny_model, corpora, "data.english_share=0.2")
    assert pipeline.resolve_defaults(other, out).stage1.tokens != 640


def test_a_given_budget_is_kept():
    cfg = config.load_config(None, ["model=m", "data.target=[t.txt]", "data.english=[e.txt]", "data.eval={de: d.txt}",
                                    "stage1.tokens=4096"])
    assert pipeline.resolve_defaults(cfg).stage1.tokens == 4096  # nothing is read: the files need not exist


@pytest.mark.slow
def test_the_embedded_demo_keeps_its_budget():
    resolved = pipeline.resolve_defaults(config.load_config(None, []))
    assert resolved.stage1.tokens == pipeline.DEMO_STAGE1_TOKENS == 160_000 and pipeline.align_tokens(resolved) == 15_872
