"""The lm-evaluation-harness bridge, on the local fixture task (tests/fixtures/lmeval) and a tiny model, offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elo_cpt import lmeval
from elo_cpt.errors import EloError

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lmeval"
TASK = "elo_tiny_mc"
QUESTIONS = [json.loads(line) for line in (TASKS / "elo_tiny_mc.jsonl").read_text().splitlines()]


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any connection attempt fails the test. Relative data_files resolve against the repo root."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)

    def refuse(self, address):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens, computed directly."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    logprobs = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(context_ids), len(whole))))


def test_in_memory_model_on_the_local_task_matches_direct_loglikelihoods(tiny_model, offline):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    on_disk = AutoModelForCausalLM.from_pretrained(tiny_model)
    # Change the model in memory only: lm-eval must score these weights, not the folder's.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.train()

    manager = lmeval.task_manager([TASK], TASKS)
    raw = lmeval.run_lm_eval(model, tokenizer, [TASK], manager, batch_size=3, log_samples=True)

    assert model.training, "the caller's train/eval mode is restored"
    records = sorted(raw["samples"][TASK], key=lambda r: r["doc_id"])
    assert len(records) == len(QUESTIONS)
    correct = 0
    for record, question in zip(records, QUESTIONS):
        assert record["doc"]["question"] == question["question"]
        scored = [resp[0][0] for resp in record["resps"]]
        direct = [continuation_logprob(model, tokenizer, context, continuation) for context, continuation in record["arguments"]]
        assert scored == pytest.approx(direct, abs=1e-3)
        disk = continuation_logprob(on_disk, tokenizer, *record["arguments"][0])
        assert abs(disk - direct[0]) > 1e-2, "the perturbation must be visible for this test to mean anything"
        correct += max(range(len(direct)), key=direct.__getitem__) == question["answer"]

    compact = lmeval.compact_results(raw)[TASK]
    assert compact["metrics"]["acc"] == pytest.approx(correct / len(QUESTIONS))
    assert compact["samples"] == len(QUESTIONS) and compact["higher_is_better"]["acc"] is True
    assert compact["stderr"]["acc"] > 0


def test_cli_runs_named_tasks_and_bits_per_char_on_a_model_folder(tiny_model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "elo_cpt.cli", "eval", str(tiny_model), "--tasks", TASK, "--include-path", str(TASKS),
         "--limit", "5", "--text", f"de={ROOT / 'tests/fixtures/text/de.txt'}", "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    scored = results["lm_eval"][TASK]
    assert scored["samples"] == 5 and 0 <= scored["metrics"]["acc"] <= 1
    # Five examples: the accuracy is a whole number of fifths.
    assert round(scored["metrics"]["acc"] * 5, 6).is_integer()
    assert 0 < results["bits_per_char"]["de"]["bits_per_char"] < 20
    assert f"{TASK}\tacc\t" in result.stdout and "bits/char" in result.stdout


def test_unknown_task_names_a_close_match(offline):
    with pytest.raises(EloError, match=r"unknown lm-eval task elo_tiny_mcq; did you mean elo_tiny_mc"):
        lmeval.task_manager(["elo_tiny_mcq"], TASKS)
    with pytest.raises(EloError, match="is not a folder"):
        lmeval.task_manager([TASK], TASKS / "missing")
    with pytest.raises(EloError, match="no lm-eval task"):
        lmeval.task_manager(lmeval.parse_tasks(" , "), TASKS)


def test_missing_local_data_is_a_one_line_error(tiny_model, tmp_path, offline):
    (tmp_path / "broken.yaml").write_text(
        (TASKS / "elo_tiny_mc.yaml").read_text().replace(f"task: {TASK}", "task: elo_broken").replace(".jsonl", "_missing.jsonl")
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(EloError, match="could not load its data") as err:
        lmeval.evaluate_tasks(model, "elo_broken", tokenizer, include_path=tmp_path)
    assert "\n" not in str(err.value)


def test_compact_results_keeps_numbers_and_filters():
    raw = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "gen": {"alias": " - gen", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1, "sample_len": 4},
        },
        "n-samples": {"gen": {"original": 10, "effective": 4}},
        "higher_is_better": {"gen": {"exact_match": True}},
        "versions": {"gen": 2.0},
    }
    compact = lmeval.compact_results(raw)
    assert compact["grp"] == {"metrics": {"acc": 0.5}, "stderr": {}, "samples": None, "higher_is_better": {}, "version": None}
    assert compact["gen"]["metrics"] == {"exact_match,strict-match": 0.25}
    assert compact["gen"]["stderr"] == {"exact_match,strict-match": 0.1}
    assert compact["gen"]["samples"] == 4 and compact["gen"]["version"] == 2.0
    assert lmeval.parse_tasks("a, b,,a") == ["a", "b"]


def test_tasks_through_the_chat_template(tmp_path, offline):
    """With chat_template, each request is rendered by the tokenizer's chat template, ending in the assistant's turn."""
    from test_sft import chat_model

    folder = chat_model(tmp_path / "chat")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    manager = lmeval.task_manager([TASK], TASKS)
    contexts = {}
    for chat in (False, True):
        raw = lmeval.run_lm_eval(model, tokenizer, [TASK], manager, log_samples=True, chat_template=chat)
        contexts[chat] = [arguments[0] for record in raw["samples"][TASK] for arguments in record["arguments"]]
    assert len(contexts[True]) == len(contexts[False]) > 0
    assert all(c.startswith("<|im_start|>user\nFrage/Question:") and c.endswith("<|im_start|>assistant\n") for c in contexts[True])
    assert not any("<|im_start|>" in c for c in contexts[False])
