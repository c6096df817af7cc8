"""Stage 3 inside `elo run` (the chat vector and SFT after the alignment, into OUT/chat_model) and the evaluation
through the chat template: tiny-model runs (resumable, redone alone when its settings change, an interrupted SFT
resumed), one-line refusals of bad chat settings before anything is written, the English-answers flag and the
report's chat section on synthetic metrics, the model card, and the demo conversations' builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors import safe_open
from test_pipeline import tiny_run_config
from test_sft import CHATML, CHATS, chat_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from elo_cpt import config, findings, modelcard, pipeline, report, report_chat, samples
from elo_cpt.demo import chats as demo_chats
from elo_cpt.errors import EloError

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = f"eval.chat={{de: {CHATS / 'de_eval.jsonl'}, en: {CHATS / 'en_eval.json'}}}"
SFT_DATA = f"sft.data=[{CHATS / 'de_train.jsonl'}@1, {CHATS / 'en_train.json'}@1]"
#: Stage 3 on the tiny models: conversations of up to 512 tokens (the fixture tokenizer's), short answers.
STAGE3 = ("chat.seq_len=512", "sft.batch_size=8", "sft.lr=1e-3", "sft.report_to=[none]", "eval.chat_tokens=6",
          "eval.sample_tokens=4", HELD_OUT)


def tensor(folder, name="model.layers.0.mlp.down_proj.weight"):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return f.get_tensor(name)


@pytest.fixture
def trio(tmp_path):
    """A tiny chat model (the run's base model) and an "Instruct" model of the same shape: the chat vector's pair."""
    return chat_model(tmp_path / "base"), chat_model(tmp_path / "instruct", seed=1)


def test_stage_3_in_elo_run(trio, corpora, tmp_path, capsys):
    base, instruct = trio
    cfg = tiny_run_config(base, corpora, f"chat.base={base}", f"chat.instruct={instruct}", SFT_DATA, *STAGE3)
    run = tmp_path / "run"
    metrics = pipeline.run(cfg, run)
    # the chat vector went into stages/chat_vector, SFT from it into chat_model/
    vector = run / "stages" / "chat_vector"
    torch.testing.assert_close(tensor(vector), tensor(run / "model") + tensor(instruct) - tensor(base))
    assert json.loads((vector / "chat_vector.json").read_text())["scale"] == 1.0
    chat = run / "chat_model"
    AutoModelForCausalLM.from_pretrained(chat)
    assert AutoTokenizer.from_pretrained(chat).chat_template == CHATML
    assert not torch.equal(tensor(chat), tensor(vector))
    assert {p.name for p in chat.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert not {"training_stats.json", "loss.png", "logs", "checkpoints"} & {p.name for p in chat.iterdir()}
    assert (run / "stages" / "sft" / "training_stats.json").is_file() and (run / "stages" / "sft" / "loss.png").is_file()
    sft = metrics["stages"]["sft"]["training"]
    assert sft["chat_data"]["conversations"] == 64 and sft["steps"] == 8 and sft["method"] == "fft"
    assert metrics["stages"]["chat_vector"]["seconds"] > 0
    # every model is evaluated on raw text and through the chat template, each once, cached per model
    models = {"base", "merged", "final", "chat_vector", "chat_model"}
    assert set(metrics["eval"]) == models == set(metrics["chat"]["answer_bits_per_char"]) == set(metrics["chat"]["answers"])
    assert {f"chat eval {m}" for m in models} <= set(metrics["stages"])
    scores = metrics["chat"]["answer_bits_per_char"]
    assert scores["chat_model"]["de"]["conversations"] == 10 and scores["chat_model"]["de"]["answer_bits_per_char"] > 0
    assert scores["chat_model"]["de"]["answer_bits_per_char"] < scores["chat_vector"]["de"]["answer_bits_per_char"]  # SFT learnt
    answers = metrics["chat"]["answers"]["chat_model"]
    assert [a["prompt"] for a in answers["de"]] == samples.DEFAULT_CHAT_PROMPTS["de"] and set(answers) == {"de", "en"}
    assert all(a["new_tokens"] <= 6 for a in answers["en"])
    assert {(r["model"], r["language"]) for r in metrics["chat"]["forgetting"]} == {(m, l) for m in ("final", "chat_model") for l in ("de", "en")}
    page = (run / report.MD_FILE).read_text()
    assert "## Chat: answers through the chat template" in page and "Wie heißt die Hauptstadt von Frankreich?" in page
    assert "| stage 3: chat model |" in page and "stage 3: SFT" in page
    card = (chat / "README.md").read_text()
    assert "# Chat model: base, adapted to German with ELO" in card and "- chat" in card and "| stage 3: chat model |" in card
    assert "answer bits/char" in capsys.readouterr().out  # the printed summary has the chat table
    # a rerun of the finished run is a no-op
    weights = (chat / "model.safetensors").stat().st_mtime_ns
    assert pipeline.run(cfg, run) == metrics
    # a changed stage-3 setting redoes stage 3 alone: the models before it stand, their evaluations are kept
    final, stage1 = (run / "model" / "model.safetensors").stat().st_mtime_ns, (run / "stages" / "stage1" / "model.safetensors").stat().st_mtime_ns
    base_chat = (run / "eval" / "base.chat.json").stat().st_mtime_ns
    redone = pipeline.run(tiny_run_config(base, corpora, f"chat.base={base}", f"chat.instruct={instruct}", SFT_DATA, *STAGE3,
                                          "sft.lr=2e-3"), run)
    assert (chat / "model.safetensors").stat().st_mtime_ns != weights
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == final
    assert (run / "stages" / "stage1" / "model.safetensors").stat().st_mtime_ns == stage1
    assert (run / "eval" / "base.chat.json").stat().st_mtime_ns == base_chat
    assert redone["config"]["sft"]["lr"] == 2e-3 and redone["chat"]["answer_bits_per_char"]["base"] == scores["base"]
    assert redone["chat"]["answer_bits_per_char"]["chat_model"] != scores["chat_model"]
    assert redone["stages"]["sft"]["training"]["resumes"] == 0
    assert redone["stages"]["sft"]["seconds"] < metrics["stages"]["sft"]["seconds"] + redone["stages"]["sft"]["training"]["seconds"]


def test_an_interrupted_sft_resumes_and_the_chat_vector_alone_makes_the_chat_model(trio, corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the local lm-eval task's data_files are relative to the repository
    base, instruct = trio
    cfg = tiny_run_config(base, corpora, SFT_DATA, *STAGE3, "align.token_ratio=0", "sft.save_steps=2", "eval.chat_tokens=0")
    run = tmp_path / "run"
    original_step = Trainer.training_step

    def crash_in_sft_step_4(self, *a, **k):
        if "chat_model.partial" in str(self.args.output_dir) and self.state.global_step == 3:
            raise RuntimeError("simulated crash")
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_in_sft_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, run)
    assert not (run / "chat_model").exists() and (run / "chat_model.partial" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(Trainer, "training_step", original_step)
    metrics = pipeline.run(cfg, run)
    sft = metrics["stages"]["sft"]["training"]
    assert sft["resumes"] == 1 and sft["steps"] == 8 and sft["chat_data"]["conversations"] == 64
    assert "chat_vector" not in metrics["stages"] and set(metrics["chat"]["answer_bits_per_char"]) == {"base", "merged", "final", "chat_model"}
    assert "answers" not in metrics["chat"] or not metrics["chat"]["answers"]  # eval.chat_tokens=0
    # the chat vector alone (no SFT) writes chat_model/ itself, with the template given by chat.template
    plain = save_tiny_model(tmp_path / "plain")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    alone = tiny_run_config(plain, corpora, f"chat.base={plain}", f"chat.instruct={save_tiny_model(tmp_path / 'other', seed=1)}",
                            f"chat.template={template}", "align.token_ratio=0", *STAGE3, "eval.tasks=[elo_tiny_mc]",
                            f"eval.include_path={ROOT / 'tests' / 'fixtures' / 'lmeval'}", "eval.chat_template_tasks=true")
    vector_only = pipeline.run(alone, tmp_path / "alone")
    assert set(vector_only["lm_eval"]) == {"base", "final", "chat_model"}  # through chat.template: the tokenizer has none
    chat = tmp_path / "alone" / "chat_model"
    assert (chat / "chat_vector.json").is_file() and not (tmp_path / "alone" / "stages" / "chat_vector").exists()
    assert AutoTokenizer.from_pretrained(chat).chat_template == CHATML and (tmp_path / "alone" / "chat_model" / "README.md").is_file()
    assert set(vector_only["chat"]["answer_bits_per_char"]) == {"base", "merged", "final", "chat_model"}
    assert vector_only["chat"]["template"] == str(template)


@pytest.mark.parametrize("override, message", [
    ("chat.base=x", "chat.base is set without chat.instruct; the chat vector is instruct - base, so give both or neither"),
    ("chat.instruct=x", "chat.instruct is set without chat.base; the chat vector is instruct - base, so give both or neither"),
    ("chat.skip=[head,tail]", "chat.skip takes embeddings and/or head, not ['head', 'tail']"),
    ("sft.method=freeze", "sft.method must be fft or lora, not 'freeze'"),
    ("sft.lr=0", "sft.lr must be positive"),
    ("chat.seq_len=4", "chat.seq_len must be at least 8 tokens (or unset: seq_len)"),
    ("eval.chat_tokens=-1", "eval.chat_tokens must be >= 0 (0 turns chat answers off)"),
    ("eval.chat_template_tasks=true", "eval.chat_template_tasks=true runs eval.tasks through the chat template, but "
                                      "eval.tasks is empty; name tasks, or leave it false"),
])
def test_bad_chat_settings_are_one_line_config_errors(override, message):
    with pytest.raises(EloError) as found:
        config.load_config(None, [override])
    assert str(found.value) == message


@pytest.mark.parametrize("case", ["missing sft data", "bad sft record", "missing held-out chats", "no chat template",
                                  "other architecture", "other shape", "missing template file"])
def test_bad_stage_3_input_fails_before_any_output(case, trio, corpora, tmp_path):
    base, instruct = trio
    plain = save_tiny_model(tmp_path / "plain")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "Hallo?"}]}\n')
    model, extra, message = base, [], ""
    if case == "missing sft data":
        extra, message = [f"sft.data=[{tmp_path}/none.jsonl]"], f"corpus {tmp_path}/none.jsonl does not exist; check the path"
    elif case == "bad sft record":
        extra, message = [f"sft.data=[{tmp_path}/bad.jsonl]"], f"{tmp_path}/bad.jsonl:1 has no assistant answer after a prompt"
    elif case == "missing held-out chats":
        extra, message = [f"eval.chat={{de: {tmp_path}/none.jsonl}}"], f"corpus {tmp_path}/none.jsonl does not exist"
    elif case == "no chat template":
        model, extra = plain, [SFT_DATA]
        message = (f"stage 3 needs a chat template, but {plain} has none (in tokenizer_config.json or chat_template.jinja); "
                   "set chat.template=FILE (e.g. the chat_template.jinja of its Instruct model)")
    elif case == "other architecture":
        other = save_tiny_model(tmp_path / "gpt2", "gpt2")
        extra, message = [f"chat.base={base}", f"chat.instruct={other}"], "the models are of different architectures"
    elif case == "other shape":
        other = save_tiny_model(tmp_path / "deeper", num_layers=6)
        extra, message = [f"chat.base={base}", f"chat.instruct={other}"], "model.layers.5"
    elif case == "missing template file":
        extra, message = [f"chat.template={tmp_path}/none.jinja"], f"chat template {tmp_path}/none.jinja does not exist"
    with pytest.raises(EloError) as found:
        pipeline.run(tiny_run_config(model, corpora, *extra), tmp_path / "run")
    assert message in str(found.value) and "\n" not in str(found.value)
    assert not (tmp_path / "run").exists()


def test_held_out_answers_also_trained_on_are_counted_in_a_warning(trio, corpora, capsys):
    held_out = CHATS / "de_eval.jsonl"
    cfg = tiny_run_config(trio[0], corpora, f"sft.data=[{held_out}, {CHATS / 'en_train.json'}]", f"eval.chat={{de: {held_out}}}")
    pipeline.stage3.check_stage3(cfg)
    assert f"warning: 10 of 10 held-out de answers of {held_out} are also in sft.data" in capsys.readouterr().err


def chat_metrics(**answers: tuple[float, float]) -> dict:
    """A run's metrics with the given (German, English) answer bits/char per model, tolerance 1%."""
    return {"config": {"target_language": "de", "data": {"replay_language": "en"}, "eval": {"english_tolerance_pct": 1.0}},
            "chat": {"template": "each model's tokenizer",
                     "answer_bits_per_char": {name: {lang: {"answer_bits_per_char": v, "answer_bits_per_byte": v}
                                                     for lang, v in zip(("de", "en"), values)} for name, values in answers.items()},
                     "answers": {"base": {"en": [{"prompt": "What is the capital of France?", "answer": "Paris.", "new_tokens": 3, "ended": True}]},
                                 "final": {"en": [{"prompt": "What is the capital of France?", "answer": "L'Étoile, le", "new_tokens": 48, "ended": False}]}}}}


def test_english_answers_worse_than_the_base_beyond_the_tolerance_are_flagged():
    rows = {(r["model"], r["language"]): r for r in findings.chat_forgetting(
        chat_metrics(base=(2.0, 1.0), merged=(2.5, 1.5), final=(1.8, 1.02), chat_model=(2.2, 1.005)))}
    assert set(rows) == {(m, l) for m in ("final", "chat_model") for l in ("de", "en")}  # merged is not checked
    assert rows["final", "en"]["flag"] and rows["final", "en"]["change_pct"] == pytest.approx(2.0)
    assert rows["final", "en"]["message"] == ("chat answers: English (en) answer bits/char of the ELO final (after alignment) "
                                              "is 2.0% worse than the base model's (1.0000 -> 1.0200; tolerance 1%)")
    assert not rows["chat_model", "en"]["flag"]  # 0.5% worse: within the tolerance
    assert not rows["chat_model", "de"]["flag"] and rows["chat_model", "de"]["verdict"] == "worse"  # the target is not forgetting
    assert rows["final", "de"]["verdict"] == "better" and not rows["final", "de"]["flag"]
    assert findings.chat_forgetting({"chat": {"not_evaluated": "no template"}}) == []


def test_the_report_has_a_chat_section_with_units_flags_and_answers():
    metrics = chat_metrics(base=(2.0, 1.0), final=(1.8, 1.02))
    content = report_chat.chat_content(metrics)
    assert content["scores"]["header"] == ["model", "de answer bits/char", "de answer bits/byte", "en answer bits/char", "en answer bits/byte"]
    assert [row["flag"] for row in content["changes"]["rows"]] == [False, True]
    assert content["answers"] == [{"language": "English (en)", "prompt": "What is the capital of France?", "answers": [
        {"model": "base model", "text": "Paris."},
        {"model": "ELO final (after alignment)", "text": "L'Étoile, le [cut at 48 tokens, no end-of-turn]"}]}]
    card = report_chat.chat_cards(metrics)[0]
    assert card["title"] == "English chat answers: ELO final (after alignment) vs base" and card["status"] == "bad"
    assert "model (answer bits/char, chat template)" in report.summary(
        {**metrics, "eval": {"base": {"de": {"bits_per_char": 2.0, "bits_per_byte": 2.0}}}, "stages": {}, "total_seconds": 1.0})
    none = report_chat.chat_content({"chat": {"not_evaluated": "MODEL has no chat template"}})
    assert none["note"] == "MODEL has no chat template" and none["scores"] is None and report_chat.chat_content({}) is None


def test_report_pages_show_the_chat_section(tmp_path):
    metrics = {**chat_metrics(base=(2.0, 1.0), final=(1.8, 1.02)), "eval": {}, "stages": {}, "total_seconds": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    html_path, md_path = report.write_report(tmp_path)
    page, markdown = html_path.read_text(), md_path.read_text()
    assert '<h2 id="chat">Chat: answers through the chat template</h2>' in page and "de answer bits/char" in page
    assert "⚠ chat answers: English (en) answer bits/char of the ELO final (after alignment) is 2.0% worse" in page
    assert "L&#39;Étoile, le [cut at 48 tokens, no end-of-turn]" in page
    assert "### What changed in the answers, against the base model" in markdown and "| base model | Paris. |" in markdown
    metrics["chat"] = {"not_evaluated": "tiny has no chat template, so no model was evaluated through one"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "tiny has no chat template, so no model was evaluated through one." in report.write_report(tmp_path)[1].read_text()


def test_the_chat_model_card():
    metrics = {"config": {"target_language": "de", "model": "/models/tiny", "layers": "0,-1", "align": {"method": "fft"},
                          "data": {"eval": {"de": "de.txt"}, "english_share": 0.1}, "eval": {"max_chars": 0, "chat": {"de": "de.jsonl"}},
                          "chat": {"base": "b", "instruct": "i", "scale": 0.5, "skip": ["head"]},
                          "sft": {"data": ["de.jsonl@1"], "method": "lora"}},
               "data": {"stage1": {"tokens": 100}, "align": {"tokens": 10}},
               "stages": {"sft": {"training": {"tokens": 1234}}},
               **{k: v for k, v in chat_metrics(base=(2.0, 1.0), final=(1.9, 1.0), chat_model=(1.5, 0.9)).items() if k == "chat"}}
    card = modelcard.chat_model_card(metrics)
    assert card.startswith("---\nlanguage:\n- de\n- en\nlibrary_name: transformers\ntags:\n- elo-cpt\n- continual-pretraining\n- chat\n---")
    assert ("Stage 3 then made this chat model of the final model: the chat vector `i` minus `b` (x 0.5) was added to it, "
            "keeping the final model's head; then it was fine-tuned (lora) on the conversations of `de.jsonl@1` (1,234 "
            "tokens), with the loss on the assistant's answers only.") in card
    assert "| stage 3: chat model | 1.5000 | 0.9000 |" in card


def page(title: str, sentence: str) -> str:
    """A help page: its title, then two lines that make an answer of 140 to 300 characters together."""
    return "\n".join([title] + [f"{title}: {sentence} {n} with enough text to make the answer long enough, and more." for n in range(2)])


def test_the_demo_conversations_hold_out_their_first_pages():
    de_pages, en_pages = [page(f"Seite {i}", "Satz") for i in range(12)], [page(f"Page {i}", "sentence") for i in range(12)]
    de_pages[3] = "Seite 3\nkurz"  # too short for an answer: page 3 is skipped in both languages
    de, en = "\n\n".join(de_pages) + "\n", "\n\n".join(en_pages) + "\n"
    found, summary = demo_chats.build(de, en, held_out=4)
    assert summary["pages"] == {"eval": [0, 1, 2, 4], "train": [5, 6, 7, 8, 9, 10, 11]}
    assert {name: len(records) for name, records in found.items()} == {"train-de": 7, "train-en": 7, "eval-de": 4, "eval-en": 4}
    first = found["eval-de"][0]["messages"]
    assert first[0] == {"role": "user", "content": "Was erklärt die GNOME-Hilfe unter „Seite 0“?"}
    assert first[1]["role"] == "assistant" and first[1]["content"] == "\n".join(de_pages[0].splitlines()[1:])
    assert found["eval-en"][1]["messages"][0]["content"] == "What is the GNOME help topic “Page 1” about?"
    asked = {split: {r["messages"][0]["content"].split("„")[1].split("“")[0] for r in found[f"{split}-de"]} for split in ("train", "eval")}
    assert asked["eval"] == {"Seite 0", "Seite 1", "Seite 2", "Seite 4"} and not asked["eval"] & asked["train"]  # disjoint pages
    # the raw-text evaluation reading less than this of the file shares no page with the training part
    assert summary["chars_before_training_pages"]["de"] == len("\n\n".join(de_pages[:5])) + 2
    with pytest.raises(EloError, match="not aligned"):
        demo_chats.build(de, "\n\n".join(en_pages[:5]), held_out=4)
    with pytest.raises(EloError, match="only 11 help pages make a conversation, not more than the 11 held out"):
        demo_chats.build(de, en, held_out=11)


def test_sft_data_demo_and_the_embedded_chat_evaluation_resolve_to_the_demo_files(tmp_path, monkeypatch):
    found = demo_chats.DemoChats(*(tmp_path / f"{n}.jsonl" for n in ("train-de", "train-en", "eval-de", "eval-en")), tmp_path / "m.json")
    monkeypatch.setattr(demo_chats, "prepare_chats", lambda: found)
    monkeypatch.setattr(pipeline.stage3, "has_chat_template", lambda cfg: True)
    cfg = pipeline.with_demo_chats(config.load_config(None, ["sft.data=[demo, my.jsonl@2]"]), embedded=True)
    assert cfg.sft.data == [str(found.train_de), str(found.train_en), "my.jsonl@2"]
    assert cfg.eval.chat == {"de": str(found.eval_de), "en": str(found.eval_en)}
    korean = pipeline.with_demo_chats(config.load_config(None, ["target_language=ko"]), embedded=True)
    assert korean.eval.chat == {"en": str(found.eval_en)} and korean.sft.data == []
    for given in (["eval.chat={de: mine.jsonl}"], ["eval.chat={}"]):  # given, or turned off
        own = config.load_config(None, given)
        assert pipeline.with_demo_chats(own, embedded=True) == own
    assert pipeline.with_demo_chats(config.load_config(), embedded=False).eval.chat is None  # own corpora: none
    monkeypatch.setattr(pipeline.stage3, "has_chat_template", lambda cfg: False)
    assert pipeline.with_demo_chats(config.load_config(), embedded=True).eval.chat is None
