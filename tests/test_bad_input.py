"""Bad input and faults as a new user meets them, across every command: each ends with one line naming the problem
and the fix, a non-zero exit, and the output location as it was (nothing half-written left behind).

The commands run in-process (`cli.main`) to keep this fast. Read-only and full disks are small tmpfs mounts, made
only where the tests run as root; elsewhere those cases are skipped with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEXT, make_tokenizer, save_tiny_model
from elo_cpt import cli, surgery

GOOD_RUN = ["data.english=[]", "data.english_share=0", "seq_len=32", "stage1.tokens=1600", "stage1.batch_size=2", "align.batch_size=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A good tiny model, a shallow model of it, and broken or unsupported variants, all in one folder."""
    root = tmp_path_factory.mktemp("models")
    good = save_tiny_model(root / "good")
    surgery.detach(good, "0,-1", root / "shallow")
    save_tiny_model(root / "other", seed=1)

    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    weights = (good / "model.safetensors").read_bytes()
    (variant("truncated") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (variant("random") / "model.safetensors").write_bytes(os.urandom(4096))
    (variant("badheader") / "model.safetensors").write_bytes(weights[:8] + b"{{{{{{{{" + weights[16:])
    (variant("badconfig") / "config.json").write_text("{not json")
    config = json.loads((good / "config.json").read_text())
    (variant("unknowntype") / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    notok = variant("notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (notok / name).unlink(missing_ok=True)
    (shallow := root / "badprov").mkdir()
    shutil.copytree(root / "shallow", shallow, dirs_exist_ok=True)
    (shallow / "elo_provenance.json").write_text("{oops")
    from transformers import BertConfig, BertLMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=8, vocab_size=384)).save_pretrained(root / "t5")
    BertLMHeadModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               vocab_size=384, is_decoder=True)).save_pretrained(root / "bert")
    for name in ("t5", "bert"):
        make_tokenizer().save_pretrained(root / name)
    (root / "garbage.txt").write_bytes(os.urandom(20_000))
    (root / "notjson.jsonl").write_text("this is not json\n")
    (root / "one.txt").write_text("Ein einziger Absatz, ohne Leerzeile dazwischen.\n")
    paragraphs = (TEXT / "de.txt").read_text().split("\n\n")
    with (root / "train.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"{i}. {paragraphs[i % len(paragraphs)]}"}, ensure_ascii=False) + "\n")
    return root


def _mount_tmpfs(path: Path, read_only: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip("read-only and full disks are tmpfs mounts, which need root")
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if read_only:
        (path / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


@pytest.fixture
def mounts(tmp_path):
    made = []

    def make(name: str, read_only: bool = False, fill: bool = False) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, read_only)
        made.append(path)
        if fill:  # every byte taken, so the first write fails with ENOSPC
            with (path / "filler").open("wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC
        return path

    yield make
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def listing(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*"))


# (args, words of the one-line message). {m}: the models folder, {w}: this test's own folder (outputs go there),
# {txt}: held-out text, {ro}: a read-only mount, {full}: a full one.
CASES = {
    # detach: what it reads
    "detach-truncated": (["detach", "{m}/truncated", "--out", "{w}/out"], "model.safetensors is truncated or corrupt"),
    "detach-random-bytes": (["detach", "{m}/random", "--out", "{w}/out"], "model.safetensors is truncated or corrupt"),
    "detach-broken-header": (["detach", "{m}/badheader", "--out", "{w}/out"], "model.safetensors is truncated or corrupt"),
    "detach-config-not-json": (["detach", "{m}/badconfig", "--out", "{w}/out"], "config.json is not valid JSON"),
    "detach-unknown-model-type": (["detach", "{m}/unknowntype", "--out", "{w}/out"], "model_type 'frobnicator'"),
    "detach-encoder-decoder": (["detach", "{m}/t5", "--out", "{w}/out"], "encoder-decoder model (t5)"),
    "detach-encoder": (["detach", "{m}/bert", "--out", "{w}/out"], "encoder model (bert)"),
    "detach-missing-model": (["detach", "{m}/missing", "--out", "{w}/out"], "does not exist"),
    "detach-layer-out-of-range": (["detach", "{m}/good", "--layers", "0,12", "--out", "{w}/new/deeper/out"], "out of range"),
    # detach: where it writes
    "detach-out-is-a-file": (["detach", "{m}/good", "--out", "{w}/afile"], "already exists"),
    "detach-out-under-a-file": (["detach", "{m}/good", "--out", "{w}/afile/out"], "is a file, not a folder"),
    "detach-out-in-proc": (["detach", "{m}/good", "--out", "/proc/elo-out"], "cannot write under /proc"),
    "detach-out-read-only": (["detach", "{m}/good", "--out", "{ro}/out"], "Read-only file system"),
    "detach-disk-full": (["detach", "{m}/good", "--out", "{full}/out"], "MB free"),
    # merge
    "merge-corrupt-base": (["merge", "{m}/truncated", "{m}/shallow", "--out", "{w}/out"], "is truncated or corrupt"),
    "merge-not-shallow": (["merge", "{m}/good", "{m}/good", "--out", "{w}/out"], "has no elo_provenance.json"),
    "merge-damaged-provenance": (["merge", "{m}/good", "{m}/badprov", "--out", "{w}/out"], "elo_provenance.json is damaged"),
    "merge-another-base": (["merge", "{m}/other", "{m}/shallow", "--out", "{w}/out"], "was detached from"),
    "merge-out-exists": (["merge", "{m}/good", "{m}/shallow", "--out", "{w}/afile"], "already exists"),
    "merge-disk-full": (["merge", "{m}/good", "{m}/shallow", "--out", "{full}/out"], "MB free"),
    "merge-read-only": (["merge", "{m}/good", "{m}/shallow", "--out", "{ro}/existing/out"], "Read-only file system"),
    # pretrain: settings and data
    "pretrain-batch-size-0": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--batch-size", "0", "--out", "{w}/out"], "batch_size"),
    "pretrain-negative-lr": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--lr", "-1", "--out", "{w}/out"], "lr must be positive"),
    "pretrain-tokens-0": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--tokens", "0", "--out", "{w}/out"], "tokens must be >= 1"),
    "pretrain-tokens-negative": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--tokens", "-5", "--out", "{w}/out"], "tokens must be >= 1"),
    "pretrain-unknown-precision": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--precision", "fp7", "--out", "{w}/out"], "precision must be one of"),
    "pretrain-seq-len-0": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--seq-len", "0", "--out", "{w}/out"], "--seq-len must be at least 1"),
    "pretrain-binary-text": (["pretrain", "{m}/shallow", "--data", "{m}/garbage.txt", "--out", "{w}/out"], "garbage.txt is not text"),
    "pretrain-missing-data": (["pretrain", "{m}/shallow", "--data", "{m}/nothing.txt", "--out", "{w}/out"], "does not exist"),
    "pretrain-out-exists": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--out", "{w}/afile"], "already exists"),
    "pretrain-out-read-only": (["pretrain", "{m}/shallow", "--data", "{m}/train.jsonl", "--out", "{ro}/out"], "Read-only file system"),
    # align and finetune
    "align-no-tokenizer": (["align", "{m}/notok", "--data", "{m}/train.jsonl", "--out", "{w}/out"], "has no tokenizer"),
    "align-corrupt-model": (["align", "{m}/random", "--data", "{m}/train.jsonl", "--out", "{w}/out"], "is truncated or corrupt"),
    "align-data-not-json": (["align", "{m}/good", "--data", "{m}/notjson.jsonl", "--out", "{w}/out"], "is not valid JSON"),
    "align-out-in-proc": (["align", "{m}/good", "--data", "{m}/train.jsonl", "--out", "/proc/elo-out"], "cannot write under /proc"),
    "finetune-freeze-bad-layers": (["finetune", "{m}/good", "--data", "{m}/train.jsonl", "--method", "freeze", "--layers", "0,77",
                                    "--seq-len", "32", "--out", "{w}/out"], "out of range"),
    "finetune-grad-accum-0": (["finetune", "{m}/good", "--data", "{m}/train.jsonl", "--grad-accum", "0", "--out", "{w}/out"], "grad_accum"),
    "finetune-save-steps-0": (["finetune", "{m}/good", "--data", "{m}/train.jsonl", "--save-steps", "0", "--out", "{w}/out"], "save_steps must be >= 1"),
    "finetune-lora-rank-0": (["finetune", "{m}/good", "--data", "{m}/train.jsonl", "--method", "lora", "--lora-rank", "0",
                              "--out", "{w}/out"], "lora_rank must be >= 1"),
    "finetune-encoder-decoder": (["finetune", "{m}/t5", "--data", "{m}/train.jsonl", "--out", "{w}/out"], "encoder-decoder"),
    # eval
    "eval-truncated": (["eval", "{m}/truncated", "--text", "de={txt}"], "is truncated or corrupt"),
    "eval-random-bytes": (["eval", "{m}/random", "--text", "de={txt}"], "is truncated or corrupt"),
    "eval-broken-header": (["eval", "{m}/badheader", "--text", "de={txt}"], "is truncated or corrupt"),
    "eval-config-not-json": (["eval", "{m}/badconfig", "--text", "de={txt}"], "config.json is not valid JSON"),
    "eval-unknown-model-type": (["eval", "{m}/unknowntype", "--text", "de={txt}"], "frobnicator"),
    "eval-no-tokenizer": (["eval", "{m}/notok", "--text", "de={txt}"], "has no tokenizer"),
    "eval-binary-text": (["eval", "{m}/good", "--text", "de={m}/garbage.txt"], "garbage.txt is not text"),
    "eval-missing-text": (["eval", "{m}/good", "--text", "de={m}/nothing.txt"], "does not exist"),
    "eval-seq-len-0": (["eval", "{m}/good", "--text", "de={txt}", "--seq-len", "0"], "--seq-len must be at least 1"),
    "eval-max-chars-negative": (["eval", "{m}/good", "--text", "de={txt}", "--max-chars", "-5"], "--max-chars must be >= 0"),
    "eval-batch-size-0": (["eval", "{m}/good", "--text", "de={txt}", "--batch-size", "0"], "--batch-size must be at least 1"),
    "eval-limit-0": (["eval", "{m}/good", "--text", "de={txt}", "--limit", "0"], "--limit must be at least 1"),
    "eval-json-is-a-folder": (["eval", "{m}/good", "--text", "de={txt}", "--json", "{w}"], "a folder, not a file"),
    "eval-json-in-proc": (["eval", "{m}/good", "--text", "de={txt}", "--json", "/proc/elo.json"], "cannot write under /proc"),
    "eval-json-under-a-file": (["eval", "{m}/good", "--text", "de={txt}", "--json", "{w}/afile/eval.json"], "is a file, not a folder"),
    "eval-json-disk-full": (["eval", "{m}/good", "--text", "de={txt}", "--json", "{full}/eval.json"], "No space left on device"),
    # run
    "run-no-replay-corpus": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}",
                             "--out", "{w}/out"], "data.target is given without data.english"),
    "run-stage1-tokens-0": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                             "stage1.tokens=0", "--out", "{w}/out"], "stage1.tokens must be >= 1"),
    "run-out-is-a-file": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                           "--out", "{w}/afile"], "is an existing file, not a folder"),
    "run-out-in-proc": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                         "--out", "/proc/elo-run"], "cannot write under /proc"),
    "run-out-read-only": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                           "--out", "{ro}/run"], "Read-only file system"),
    "run-disk-full": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                       "--out", "{full}/run"], "MB free"),
    "run-no-tokenizer": (["run", "model={m}/notok", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                          "--out", "{w}/new/out"], "has no tokenizer"),
    "run-corrupt-model": (["run", "model={m}/badheader", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                           "--out", "{w}/out"], "is truncated or corrupt"),
    "run-encoder-decoder": (["run", "model={m}/t5", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                             "--out", "{w}/out"], "encoder-decoder"),
    "run-binary-eval-text": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {m}/garbage.txt}}", *GOOD_RUN,
                              "--out", "{w}/out"], "garbage.txt is not text"),
    "run-binary-training-text": (["run", "model={m}/good", "data.target=[{m}/garbage.txt]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                                  "--out", "{w}/new/out"], "garbage.txt is not text"),
    "run-negative-max-chars": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                                "eval.max_chars=-5", "--out", "{w}/out"], "eval.max_chars must be >= 0"),
    "run-one-document-corpus": (["run", "model={m}/good", "data.target=[{m}/one.txt]", "data.eval={{de: {txt}}}", *GOOD_RUN,
                                 "--out", "{w}/new/out"], "one.txt holds 1 document, too few to hold out 10%"),
    "run-control-without-alignment": (["run", "model={m}/good", "data.target=[{m}/train.jsonl]", "data.eval={{de: {txt}}}",
                                       *GOOD_RUN, "control=true", "align.token_ratio=0", "--out", "{w}/out"],
                                      "control=true aligns the base model alone"),
    # bridge
    "bridge-seq-len-0": (["bridge", "{m}/shallow", "--data", "{m}/train.jsonl", "--seq-len", "0"], "--seq-len must be at least 1"),
    "bridge-binary-text": (["bridge", "{m}/shallow", "--data", "{m}/garbage.txt", "--tokens", "64", "--seq-len", "32"], "garbage.txt is not text"),
    # bench and plan
    "bench-step-in-backward-galore": (["bench", "{m}/good", "--methods", "align", "--align-method", "galore", "--align-step-in-backward"],
                                      "--align-method galore cannot: use --align-method adamw, adamw_kahan, adafactor"),
    "plan-step-in-backward-two-gpus": (["plan", "smollm2-135m", "--gpus", "2", "--gpu-memory", "80", "--step-in-backward"],
                                       "--step-in-backward runs on one GPU"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(case, models, tmp_path, mounts, capsys, monkeypatch):
    args, words = CASES[case]
    monkeypatch.delenv("ELO_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("an existing file\n")
    places = {"m": models, "w": work, "txt": TEXT / "de.txt"}
    if any("{ro}" in a for a in args):
        places["ro"] = mounts("ro", read_only=True)
    if any("{full}" in a for a in args):
        places["full"] = mounts("full", fill=True)
    before = listing(tmp_path, models)
    code = cli.main([a.format(**places) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("elo: error:")]
    assert code == 1, err[-2000:]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    assert listing(tmp_path, models) == before


def test_an_os_error_while_writing_is_one_line_and_the_staging_folder_goes(models, tmp_path, capsys, monkeypatch):
    """What slips past the checks (here a disk that fills up while detach writes) is still one line, and the
    half-written output is removed; ELO_DEBUG=1 shows the traceback as well."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(surgery, "save_shallow", full)
    monkeypatch.delenv("ELO_DEBUG", raising=False)
    assert cli.main(["detach", str(models / "good"), "--out", str(tmp_path / "a" / "out")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"elo: error: No space left on device: {tmp_path / 'a' / 'out'}; free some space or "
                                            "choose another --out on a larger disk, then rerun (ELO_DEBUG=1 shows the traceback)")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("ELO_DEBUG", "1")
    assert cli.main(["detach", str(models / "good"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("elo: error: No space left on device")
    assert cli.main(["--debug", "eval", str(models / "random"), "--text", f"de={TEXT / 'de.txt'}"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_run_whose_disk_fills_while_it_builds_the_data_leaves_no_run_folder(models, tmp_path, capsys, monkeypatch):
    from elo_cpt import pipeline

    def fills_up(cfg, folder, *args, **kwargs):
        (folder / "stage1.jsonl").write_text('{"text": "half"}\n')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_mixtures", fills_up)
    out = tmp_path / "runs" / "first"
    code = cli.main(["run", f"model={models / 'good'}", f"data.target=[{models / 'train.jsonl'}]",
                     f"data.eval={{de: {TEXT / 'de.txt'}}}", *GOOD_RUN, "--out", str(out)])
    assert code == 1 and "No space left on device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # neither the run folder, its staged data, nor the parent made for it


def test_a_failed_training_stage_that_never_started_leaves_no_partial_folder(models, tmp_path, capsys):
    """An error before the first checkpoint of a stage this command started removes OUT.partial; a stage with a
    checkpoint to resume from keeps it (tests/test_train.py)."""
    out = tmp_path / "out"
    code = cli.main(["finetune", str(models / "good"), "--data", str(models / "train.jsonl"), "--method", "freeze",
                     "--layers", "0,77", "--seq-len", "32", "--out", str(out)])
    assert code == 1 and not out.exists() and not (tmp_path / "out.partial").exists()
    capsys.readouterr()


def test_a_few_bad_bytes_are_replaced_with_a_warning(models, tmp_path, capsys):
    text = (TEXT / "de.txt").read_bytes()
    damaged = tmp_path / "de.txt"
    damaged.write_bytes(text[:200] + b"\xff\xfe" + text[200:])
    assert cli.main(["eval", str(models / "good"), "--text", f"de={damaged}", "--max-chars", "500", "--seq-len", "32"]) == 0
    assert "invalid UTF-8 byte sequence(s) replaced" in capsys.readouterr().err


def test_the_command_line_prints_one_line_not_a_traceback(models, tmp_path):
    result = subprocess.run([sys.executable, "-m", "elo_cpt.cli", "detach", str(models / "truncated"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("elo: error:") and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
