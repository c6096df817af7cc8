"""The end of `elo run`: evaluate the base, merged and final models (and the alignment-only control and stage 3's
models), write metrics.json, the model cards and the report. Each model's results are cached in OUT/eval/, so a
resumed or updated run evaluates only what is missing.

Through the chat template, when the models have one: answer bits/char on held-out conversations (`eval.chat`) and
greedy answers to fixed prompts (`eval.chat_prompts`, built-in German and English ones), for every model; with
`eval.chat_template_tasks`, the lm-eval tasks too.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from elo_cpt import chateval, checkpoint, evaluation, files, findings, lmeval, modelcard, precision as precision_mod, report, samples, train
from elo_cpt import vocabulary
from elo_cpt import pipeline_stage3 as stage3
from elo_cpt.config import RunConfig, elo_version
from elo_cpt.stageclock import Timings


log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)
#: Where a run with vocab.add keeps its model with the extended vocabulary (`pipeline.vocab_step`).
VOCAB_DIR = "stages/vocab"


def finish_run(cfg: RunConfig, out: Path, resolved: dict, data_summary: dict, timings: Timings,
               task_manager: lmeval.TaskManager | None, started: float) -> dict:
    """Evaluate the base, merged and final models, then write metrics.json and the report."""
    stage1, merged, model_dir = out / "stages" / "stage1", out / "stages" / "merged", out / "model"
    align_record = out / "stages" / "align"
    # the final model folder holds the model alone, ready to share; the alignment's logs and stats go with its stage
    for name in (train.STATS_FILE, "loss.png", "logs"):
        if (model_dir / name).exists():
            align_record.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(align_record / name, ignore_errors=True)
            (model_dir / name).rename(align_record / name)
    stage3.move_sft_records(out)
    chat_model = out / stage3.CHAT_MODEL
    chat = chat_settings(cfg)
    log("[6/6] evaluating: bits/char on held-out text, generation samples" + (", chat answers" if chat else "")
        + (", lm-eval tasks" if cfg.eval.tasks else ""))
    results, samples_out, benchmarks, chat_results = {}, {}, {}, {}
    models = [("base", cfg.model), ("merged", merged), ("final", model_dir)]
    models += [("control", out / "stages" / "control")] if cfg.control else []
    models += [("chat_vector", out / "stages" / "chat_vector")] if cfg.chat.base and cfg.sft.data else []
    models += [(stage3.CHAT_MODEL, chat_model)] if stage3.enabled(cfg) else []
    for name, path in models:
        if name != "base" and not checkpoint.safetensors_files(Path(path)) and not (out / "eval" / f"{name}.json").is_file():
            log(f"  the {findings.label(name)} was deleted (keep_intermediate=false): it is not evaluated again")
            continue
        results[name], samples_out[name], scored, chat_results[name] = evaluate_model(
            cfg, name, path, out / "eval", timings, task_manager, chat)
        if scored is not None:
            benchmarks[name] = scored
    stages = {name: {"seconds": seconds} for name, seconds in timings.seconds.items()}
    for name, folder in (("stage1", stage1), ("align", align_record), ("control", out / "stages" / "control"),
                         ("sft", out / "stages" / "sft")):
        if (folder / train.STATS_FILE).is_file():
            stages.setdefault(name, {})["training"] = json.loads((folder / train.STATS_FILE).read_text())
    metrics = {
        "config": resolved,
        "data": data_summary,
        "stages": stages,
        "eval": results,
        "samples": {name: found for name, found in samples_out.items() if found},
        **({"lm_eval": benchmarks} if benchmarks else {}),
        "chat": chat_metrics(cfg, chat, chat_results),
        **({"vocab": vocab_metrics(cfg, out)} if cfg.vocab.add else {}),
        "environment": environment(stages),
        "total_seconds": round(sum(timings.seconds.values()), 1),
        "this_invocation_seconds": round(time.perf_counter() - started, 1),
    }
    metrics["forgetting"] = findings.forgetting(metrics)
    if "not_evaluated" not in metrics["chat"]:
        metrics["chat"]["forgetting"] = findings.chat_forgetting(metrics)
    files.write_text(model_dir / "README.md", modelcard.model_card(metrics))  # the model card, for sharing it
    if chat_model.is_dir():
        files.write_text(chat_model / "README.md", modelcard.chat_model_card(metrics))
    files.write_json(out / "metrics.json", metrics)
    if not cfg.keep_intermediate:
        drop_intermediate(out)
    print(report.summary(metrics))
    print_report(out)
    return metrics


def vocab_metrics(cfg: RunConfig, out: Path) -> dict:
    """metrics.json's `vocab`: the extension's summary (`elo_vocab.json` without its token list) and the tokens per
    character of each held-out text, as bits/char reads it (eval.max_chars), with the base and extended tokenizers."""
    folder = out / VOCAB_DIR
    summary = json.loads((folder / vocabulary.VOCAB_FILE).read_text(encoding="utf-8"))
    texts = {lang: evaluation.read_eval_text(path, cfg.eval.max_chars) for lang, path in cfg.data.eval.items()}
    return {**{k: v for k, v in summary.items() if k != "new_tokens"}, "held_out_tokens_per_char":
            vocabulary.held_out_tokens_per_char(checkpoint.load_tokenizer(cfg.model), checkpoint.load_tokenizer(folder), texts)}


def drop_intermediate(out: Path) -> None:
    """Delete the weights of the stage-1, merged, control and chat-vector models (keep_intermediate=false), once
    evaluated; their configs, stats and provenance stay, so the report still shows what they cost."""
    freed = 0
    for folder in (out / "stages" / name for name in ("stage1", "merged", "control", "chat_vector")):
        if folder.is_dir():
            for weights in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
                freed += weights.stat().st_size
                weights.unlink()
    if freed:
        log(f"deleted the intermediate models' weights (keep_intermediate=false): {freed / 1e6:,.0f} MB freed")


def environment(stages: dict) -> dict:
    """When and on what the run finished: date, elo-cpt, Python and library versions, the machine and the precision
    of each training stage (recorded with the stage, so a resumed run reports what trained)."""
    trained = {name: stage["training"] for name, stage in stages.items() if (stage.get("training") or {}).get("precision")}
    machine = next((t.get("hardware") for t in trained.values() if t.get("hardware")), None) or precision_mod.hardware()
    return {"finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "elo_cpt": elo_version(),
            "python": platform.python_version(), **machine,
            "processes": max((t.get("processes", 1) for t in trained.values()), default=1),
            "precision": {name: t["precision"] for name, t in trained.items()}}


def chat_settings(cfg: RunConfig) -> dict | None:
    """What the chat evaluation asks of each model: held-out conversations, prompts, answer length and the template
    (None: each tokenizer's own); None when the run's models have no chat template (`pipeline_stage3.check_stage3`
    has refused the run if a chat evaluation was asked for explicitly)."""
    languages = [cfg.target_language, *cfg.data.eval, *(cfg.eval.chat or {})]
    prompts = samples.prompts_for(languages, cfg.eval.chat_prompts, samples.DEFAULT_CHAT_PROMPTS) if cfg.eval.chat_tokens else {}
    if not (cfg.eval.chat or prompts) or not stage3.has_chat_template(cfg):
        return None
    return {"conversations": cfg.eval.chat or {}, "prompts": prompts, "template": stage3.template_text(cfg)}


def chat_metrics(cfg: RunConfig, chat: dict | None, found: dict[str, dict | None]) -> dict:
    """metrics.json's `chat`: answer bits/char ({model: {lang: ...}}) and greedy answers ({model: {lang: [...]}})
    through the chat template, or why there are none."""
    if chat is None and not stage3.has_chat_template(cfg):
        return {"not_evaluated": f"{cfg.model} has no chat template, so no model was evaluated through one; set "
                                 "chat.template=FILE (e.g. the Instruct model's chat_template.jinja) to evaluate them"}
    if chat is None:
        return {"not_evaluated": "no held-out conversations (eval.chat) and no chat prompts for the run's languages "
                                 "(eval.chat_prompts, eval.chat_tokens), so no model was evaluated through the chat template"}
    return {"template": cfg.chat.template or "each model's tokenizer",
            "answer_bits_per_char": {name: f["answer_bits_per_char"] for name, f in found.items() if f and f["answer_bits_per_char"]},
            "answers": {name: f["answers"] for name, f in found.items() if f and f["answers"]}}


def evaluate_model(
    cfg: RunConfig, name: str, path: Path | str, eval_dir: Path, timings: Timings, task_manager: lmeval.TaskManager | None,
    chat: dict | None = None,
) -> tuple[dict, dict, dict | None, dict | None]:
    """Bits/char, generation samples, (base, final and the stage-3 model only) lm-eval scores and, with `chat`
    (`chat_settings`), answer bits/char and chat answers of one model, each cached in `eval_dir`.

    The model is loaded once for all of them, and only when something is missing.
    """
    eval_dir.mkdir(parents=True, exist_ok=True)
    bits, sampled, scored, answered = (eval_dir / f"{name}{suffix}.json" for suffix in ("", ".samples", ".lm_eval", ".chat"))
    wanted_prompts = samples.prompts_for([cfg.target_language, *cfg.data.eval], cfg.eval.prompts) if cfg.eval.sample_tokens else {}
    benchmark = task_manager is not None and name in ("base", "final", stage3.CHAT_MODEL)
    missing = [f for f in (bits, sampled) if not f.is_file()] + ([scored] if benchmark and not scored.is_file() else [])
    missing += [answered] if chat is not None and not answered.is_file() else []
    if missing:
        log(f"  evaluating the {findings.label(name)}")
        model, tokenizer = evaluation.load_for_eval(path)
        if bits in missing or sampled in missing:
            with timings.step(f"eval {name}"):
                if bits in missing:
                    result = evaluation.evaluate(model, cfg.data.eval, tokenizer, seq_len=cfg.seq_len, max_chars=cfg.eval.max_chars,
                                                 batch_size=cfg.eval.batch_size)
                    files.write_json(bits, result)
                if sampled in missing:
                    files.write_json(sampled, samples.generate_samples(model, tokenizer, wanted_prompts, cfg.eval.sample_tokens))
        if answered in missing:
            with timings.step(f"chat eval {name}"):
                files.write_json(answered, chat_evaluation(cfg, model, tokenizer, chat))
        if scored in missing:
            log(f"  lm-eval {', '.join(cfg.eval.tasks)} on the {findings.label(name)}"
                + (" through the chat template" if cfg.eval.chat_template_tasks else ""))
            if cfg.eval.chat_template_tasks and chat and chat["template"]:
                tokenizer.chat_template = chat["template"]  # lm-eval renders with the tokenizer's template
            with timings.step(f"lm-eval {name}"):
                raw = lmeval.run_lm_eval(model, tokenizer, cfg.eval.tasks, task_manager, cfg.eval.limit, cfg.eval.batch_size,
                                         chat_template=cfg.eval.chat_template_tasks)
                files.write_json(scored, lmeval.compact_results(raw))
        del model
        gc.collect()
    loaded = [json.loads(f.read_text()) for f in (bits, sampled)]
    return (loaded[0], loaded[1], json.loads(scored.read_text()) if benchmark else None,
            json.loads(answered.read_text()) if chat is not None else None)


def chat_evaluation(cfg: RunConfig, model, tokenizer, chat: dict) -> dict:
    """One model's answer bits/char on the held-out conversations and its greedy answers to the chat prompts."""
    template = chat["template"]
    scores = {lang: chateval.answer_bits_per_char(model, tokenizer, source, stage3.chat_seq_len(cfg), cfg.eval.batch_size, template)
              for lang, source in chat["conversations"].items()}
    answers = {lang: chateval.chat_samples(model, tokenizer, prompts, cfg.eval.chat_tokens, template)
               for lang, prompts in chat["prompts"].items()}
    return {"answer_bits_per_char": scores, "answers": answers}


def check_eval_settings(cfg: RunConfig) -> lmeval.TaskManager | None:
    """The lm-eval task manager when tasks are named, after checking that they exist (before anything is trained;
    the settings' values are checked with the rest of the config, in `config.validate`)."""
    return lmeval.task_manager(cfg.eval.tasks, cfg.eval.include_path) if cfg.eval.tasks else None


def print_report(out: Path) -> None:
    html_path, md_path = report.write_report(out)
    print(f"report: {html_path} (and {md_path.name})")
