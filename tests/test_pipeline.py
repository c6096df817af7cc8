"""`elo run` end to end on a tiny model, and on the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from elo_cpt import config, pipeline, report, stageclock, train
from elo_cpt.errors import EloError


def tiny_run_config(tiny_model, corpora, *extra):
    return config.load_config(None, [
        f"model={tiny_model}",
        f"data.target=[{corpora['train_de']}]",
        f"data.english=[{corpora['train_en']}]",
        f"data.eval={{de: {corpora['eval_de']}, en: {corpora['eval_en']}}}",
        "seq_len=32", "stage1.tokens=1600", "stage1.lr=1e-3", "stage1.batch_size=2", "align.batch_size=2", "align.lr=1e-3",
        "align.eval_steps=1",
        *extra,
    ])


def test_pipeline_on_a_tiny_model(tiny_model, corpora, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model, corpora)
    metrics = pipeline.run(cfg, tmp_path / "run")
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 5
    # The base model's tokenizer comes with the final model.
    final, base = AutoTokenizer.from_pretrained(run / "model"), AutoTokenizer.from_pretrained(tiny_model)
    assert final.get_vocab() == base.get_vocab() and final.eos_token == base.eos_token
    assert final("Guten Morgen, Welt.")["input_ids"] == base("Guten Morgen, Welt.")["input_ids"]
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert set(metrics["eval"]) == {"base", "merged", "final"}
    assert set(metrics["eval"]["final"]) == {"de", "en"}
    assert metrics["stages"]["stage1"]["training"]["tokens"] == 1600 and metrics["stages"]["align"]["training"]["tokens"] == 160
    assert {"detach", "stage1", "merge", "align", "eval base", "eval merged", "eval final"} == set(metrics["stages"])
    # the held-out loss during alignment (align.eval_steps) on data.eval's texts, after each of its 3 steps
    assert {lang: [s for s, _ in points] for lang, points in metrics["stages"]["align"]["training"]["eval_losses"].items()} == {
        "de": [1, 2, 3], "en": [1, 2, 3]}
    assert metrics["data"]["stage1"]["byte_share"]["en"] == pytest.approx(0.1, abs=0.002)
    assert metrics["data"]["eval_overlap"] == {"de": 0, "en": 0}
    # The two stages train on disjoint documents.
    stage1 = {json.loads(line)["text"] for line in (run / "data" / "stage1.jsonl").read_text().splitlines()}
    aligned = {json.loads(line)["text"] for line in (run / "data" / "align.jsonl").read_text().splitlines()}
    assert stage1 and aligned and not stage1 & aligned
    assert "bits/char" in capsys.readouterr().out
    assert (run / "data").stat().st_mode & 0o777 == (run / "model").stat().st_mode & 0o777  # not mkdtemp's 0700
    assert not {"logs", "loss.png", "training_stats.json"} & {p.name for p in (run / "model").iterdir()}
    assert (run / "stages" / "align" / "loss.png").is_file() and (run / "stages" / "align" / "logs").is_dir()
    card = (run / "model" / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- de\n- en\n") and "| base model |" in card and "| ELO final (after alignment) |" in card
    # a model without a chat template is evaluated on raw text only, and the report says why
    assert metrics["chat"] == {"not_evaluated": f"{tiny_model} has no chat template, so no model was evaluated through one; "
                                                "set chat.template=FILE (e.g. the Instruct model's chat_template.jinja) to evaluate them"}
    assert f"{tiny_model} has no chat template" in (run / report.MD_FILE).read_text()
    # A rerun of a finished run is a no-op; another configuration in the same folder is refused.
    assert pipeline.run(cfg, run) == metrics
    with pytest.raises(EloError, match=r"another configuration \(layers: '0,-1' -> '0,1'\)"):
        pipeline.run(tiny_run_config(tiny_model, corpora, "layers=0,1"), run)
    # Evaluation settings alone may change: the trained models stay, their evaluation is redone.
    stage1_weights = (run / "stages" / "stage1" / "model.safetensors").stat().st_mtime_ns
    again = pipeline.run(tiny_run_config(tiny_model, corpora, "eval.max_chars=500"), run)
    full = len(corpora["eval_de"].read_text().strip())
    assert (again["eval"]["final"]["de"]["chars"], metrics["eval"]["final"]["de"]["chars"]) == (352, full)  # whole paragraphs
    assert (run / "stages" / "stage1" / "model.safetensors").stat().st_mtime_ns == stage1_weights
    assert again["config"]["eval"]["max_chars"] == 500 and (run / "report.html").is_file()
    assert again["environment"]["precision"] == {"stage1": "32-true", "align": "32-true"}
    assert again["environment"]["device"] == "cpu" and again["environment"]["elo_cpt"] == config.elo_version()
    # The alignment-only control can be added to a finished run: it alone trains, the other evaluations are kept.
    final_weights = (run / "model" / "model.safetensors").stat().st_mtime_ns
    base_eval = (run / "eval" / "base.json").stat().st_mtime_ns
    controlled = pipeline.run(tiny_run_config(tiny_model, corpora, "eval.max_chars=500", "control=true"), run)
    assert set(controlled["eval"]) == {"base", "merged", "final", "control"}
    assert controlled["stages"]["control"]["training"]["tokens"] == 160 == controlled["stages"]["align"]["training"]["tokens"]
    assert controlled["eval"]["base"] == again["eval"]["base"] and (run / "eval" / "base.json").stat().st_mtime_ns == base_eval
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == final_weights
    assert (run / "stages" / "stage1" / "model.safetensors").stat().st_mtime_ns == stage1_weights
    assert "Stage 1's own contribution in German: the final model is" in (run / "report.md").read_text()
    assert controlled["environment"]["precision"] == {"stage1": "32-true", "align": "32-true", "control": "32-true"}
    # Dropping the intermediate models deletes their weights and keeps their evaluation, stats and provenance.
    lean = pipeline.run(tiny_run_config(tiny_model, corpora, "eval.max_chars=500", "control=true", "keep_intermediate=false"), run)
    assert lean["eval"] == controlled["eval"] and lean["stages"]["control"]["training"] == controlled["stages"]["control"]["training"]
    for name in ("stage1", "merged", "control"):
        kept = {p.name for p in (run / "stages" / name).iterdir()}
        assert not any(n.endswith(".safetensors") for n in kept) and "config.json" in kept, kept
    assert (run / "stages" / "stage1" / "elo_provenance.json").is_file() and (run / "model" / "model.safetensors").is_file()
    # evaluated again, the deleted models are left out, not failed on
    again = pipeline.run(tiny_run_config(tiny_model, corpora, "eval.max_chars=400", "control=true", "keep_intermediate=false"), run)
    assert set(again["eval"]) == {"base", "final"}


def test_held_out_text_seen_in_training_is_reported(tiny_model, corpora, tmp_path, capsys):
    leaked = tmp_path / "leaked_de.txt"
    documents = [json.loads(line)["text"] for line in corpora["train_de"].read_text().splitlines()]
    leaked.write_text("Ein Absatz, der nirgends sonst vorkommt, und lang genug ist.\n\n" + "\n\n".join(documents[:3]))
    cfg = tiny_run_config(tiny_model, corpora, f"data.eval={{de: {leaked}, en: {corpora['eval_en']}}}", "align.token_ratio=0")
    metrics = pipeline.run(cfg, tmp_path / "run")
    # Stage 1 takes the corpus's leading documents, so all three leaked ones were trained on.
    assert metrics["data"]["eval_overlap"] == {"de": 3, "en": 0}
    assert "3 of 4 paragraphs also occur in the training data" in capsys.readouterr().err


def test_alignment_budget_zero_keeps_the_merged_model(tiny_model, corpora, tmp_path):
    (tmp_path / ".run.data.killed").mkdir()  # the staging folder of a run killed while it built the mixtures
    metrics = pipeline.run(tiny_run_config(tiny_model, corpora, "align.token_ratio=0"), tmp_path / "run")
    assert not list(tmp_path.glob(".run.*")), "a killed run's staging folder was left behind"
    assert "training" not in metrics["stages"]["align"]
    assert metrics["eval"]["final"] == metrics["eval"]["merged"]


def test_a_run_interrupted_in_stage_1_reports_the_time_of_every_invocation(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    cfg = tiny_run_config(tiny_model, corpora, "stage1.save_steps=5", "align.token_ratio=0")
    run = tmp_path / "run"
    original_step, calls, pause = Trainer.training_step, [], 0.2

    def crash_at_step_12(self, *a, **k):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("simulated crash")
        time.sleep(pause)  # 11 slow steps in the interrupted invocation, none in the rerun
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_at_step_12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, run)
    interrupted = json.loads((run / "timings.json").read_text())["stage1"]
    assert interrupted >= 11 * pause

    original_pretrain, rerun, rerun_steps = train.pretrain, [], []

    def timed_pretrain(*a, **k):
        start = time.perf_counter()
        try:
            return original_pretrain(*a, **k)
        finally:
            rerun.append(time.perf_counter() - start)

    def counted_step(self, *a, **k):
        rerun_steps.append(self.state.global_step)
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", counted_step)
    monkeypatch.setattr(train, "pretrain", timed_pretrain)
    metrics = pipeline.run(cfg, run)
    stage1 = metrics["stages"]["stage1"]
    # The rerun resumed stage 1 from checkpoint-10 (the last before the crash in step 12): 15 of its 25 steps.
    assert rerun_steps == list(range(10, 25)) and stage1["training"]["steps"] == 25
    assert stage1["training"]["resumes"] == 1 and stage1["training"]["tokens"] == 1600
    # The step and its training count both invocations: more than the rerun's own share, by the interrupted part.
    assert stage1["seconds"] >= interrupted + rerun[0] - 0.02
    assert stage1["training"]["seconds"] > 11 * pause and stage1["training"]["seconds"] > rerun[0]
    assert metrics["total_seconds"] == round(sum(json.loads((run / "timings.json").read_text()).values()), 1)
    assert "this_invocation_seconds" in metrics
    assert "resumed: ELO stage 1 1x" in capsys.readouterr().out
    assert "| resumes |" in (run / report.MD_FILE).read_text()


def test_timings_keep_a_killed_step_and_add_its_rerun(tmp_path):
    """A step's running total is on disk while it runs, so a SIGKILL loses at most a second of it."""
    path = tmp_path / "timings.json"
    script = ("import sys, time; from pathlib import Path; from elo_cpt.pipeline import Timings\n"
              "with Timings(Path(sys.argv[1]), every=0.1).step('align'):\n    time.sleep(300)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(path)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline and json.loads(path.read_text() if path.is_file() else "{}").get("align", 0) < 1:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = json.loads(path.read_text())["align"]
    assert killed >= 1
    timings = stageclock.Timings(path)
    start = time.perf_counter()
    with timings.step("align"):
        time.sleep(0.2)
    own = time.perf_counter() - start
    assert timings.seconds["align"] >= killed + own - 0.01 and json.loads(path.read_text()) == timings.seconds


@pytest.mark.parametrize(
    "override, message",
    [("layers=0,9", "out of range"), ("data.target=[{tmp}/empty.txt]", "is empty"), ("model={tmp}/none", "does not exist"),
     ("stage1.tokens=100000", "too little text"), ("data.eval={{de: {tmp}/none.txt}}", "does not exist")],
)
def test_bad_input_fails_before_any_output(tiny_model, corpora, tmp_path, override, message):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(EloError, match=message):
        pipeline.run(tiny_run_config(tiny_model, corpora, override.format(tmp=tmp_path)), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run.*")), "the mixtures' staging folder was left behind"


@pytest.mark.slow
def test_default_pipeline_on_smollm2_improves_german(tmp_path):
    """The real model and corpora, with a small budget: the final model must model German better than the base."""
    cfg = config.load_config(None, ["stage1.tokens=16384", "align.tokens=8192", "eval.max_chars=8000"])
    metrics = pipeline.run(cfg, tmp_path / "run")
    german = {name: result["de"]["bits_per_char"] for name, result in metrics["eval"].items()}
    assert german["final"] < german["base"], german
    assert metrics["stages"]["stage1"]["training"]["trainable_params"] == 2 * 3_540_096
    # The held-out GNOME help pages share no paragraph with the training text.
    assert metrics["data"]["eval_overlap"] == {"de": 0, "en": 0}
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")


def test_the_replay_language_labels_the_mixture_and_the_forgetting_check(tiny_model, corpora, tmp_path):
    cfg = tiny_run_config(tiny_model, corpora, "data.replay_language=fr", "stage1.tokens=640", "eval.sample_tokens=0",
                          f"data.eval={{de: {corpora['eval_de']}, fr: {corpora['eval_en']}}}")
    metrics = pipeline.run(cfg, tmp_path / "run")
    assert set(metrics["data"]["stage1"]["byte_share"]) == {"de", "fr"}
    assert "French (forgetting check)" in [card["title"] for card in report.headline(metrics)]
    assert "language:\n- de\n- fr\n" in (tmp_path / "run" / "model" / "README.md").read_text()
    with pytest.raises(EloError, match="the embedded replay corpus is English"):
        pipeline.resolve_defaults(config.load_config(None, ["data.replay_language=fr"]))
