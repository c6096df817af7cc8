"""The end of `elo run`: evaluate the base, merged and final models (and the alignment-only control), write
metrics.json, the model card and the report. Each model's results are cached in OUT/eval/, so a resumed or updated
run evaluates only what is missing.
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

from elo_cpt import checkpoint, evaluation, files, findings, lmeval, modelcard, precision as precision_mod, report, samples, train
from elo_cpt.config import RunConfig, elo_version
from elo_cpt.stageclock import Timings


log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)


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
    log("[6/6] evaluating: bits/char on held-out text, generation samples" + (", lm-eval tasks" if cfg.eval.tasks else ""))
    results, samples_out, benchmarks = {}, {}, {}
    models = [("base", cfg.model), ("merged", merged), ("final", model_dir)]
    models += [("control", out / "stages" / "control")] if cfg.control else []
    for name, path in models:
        if name != "base" and not checkpoint.safetensors_files(Path(path)) and not (out / "eval" / f"{name}.json").is_file():
            log(f"  the {findings.label(name)} was deleted (keep_intermediate=false): it is not evaluated again")
            continue
        results[name], samples_out[name], scored = evaluate_model(cfg, name, path, out / "eval", timings, task_manager)
        if scored is not None:
            benchmarks[name] = scored
    stages = {name: {"seconds": seconds} for name, seconds in timings.seconds.items()}
    for name, folder in (("stage1", stage1), ("align", align_record), ("control", out / "stages" / "control")):
        if (folder / train.STATS_FILE).is_file():
            stages[name]["training"] = json.loads((folder / train.STATS_FILE).read_text())
    metrics = {
        "config": resolved,
        "data": data_summary,
        "stages": stages,
        "eval": results,
        "samples": {name: found for name, found in samples_out.items() if found},
        **({"lm_eval": benchmarks} if benchmarks else {}),
        "environment": environment(stages),
        "total_seconds": round(sum(timings.seconds.values()), 1),
        "this_invocation_seconds": round(time.perf_counter() - started, 1),
    }
    metrics["forgetting"] = findings.forgetting(metrics)
    files.write_text(model_dir / "README.md", modelcard.model_card(metrics))  # the model card, for sharing it
    files.write_json(out / "metrics.json", metrics)
    if not cfg.keep_intermediate:
        drop_intermediate(out)
    print(report.summary(metrics))
    print_report(out)
    return metrics


def drop_intermediate(out: Path) -> None:
    """Delete the weights of the stage-1, merged and control models (keep_intermediate=false), once evaluated; their
    configs, stats and provenance stay, so the report still shows what they cost."""
    freed = 0
    for folder in (out / "stages" / name for name in ("stage1", "merged", "control")):
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


def evaluate_model(
    cfg: RunConfig, name: str, path: Path | str, eval_dir: Path, timings: Timings, task_manager: lmeval.TaskManager | None
) -> tuple[dict, dict, dict | None]:
    """Bits/char, generation samples and (base and final only) lm-eval scores of one model, each cached in `eval_dir`.

    The model is loaded once for all of them, and only when something is missing.
    """
    eval_dir.mkdir(parents=True, exist_ok=True)
    bits, sampled, scored = (eval_dir / f"{name}{suffix}.json" for suffix in ("", ".samples", ".lm_eval"))
    wanted_prompts = samples.prompts_for([cfg.target_language, *cfg.data.eval], cfg.eval.prompts) if cfg.eval.sample_tokens else {}
    benchmark = task_manager is not None and name in ("base", "final")
    missing = [f for f in (bits, sampled) if not f.is_file()] + ([scored] if benchmark and not scored.is_file() else [])
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
        if scored in missing:
            log(f"  lm-eval {', '.join(cfg.eval.tasks)} on the {findings.label(name)}")
            with timings.step(f"lm-eval {name}"):
                raw = lmeval.run_lm_eval(model, tokenizer, cfg.eval.tasks, task_manager, cfg.eval.limit, cfg.eval.batch_size)
                files.write_json(scored, lmeval.compact_results(raw))
        del model
        gc.collect()
    loaded = [json.loads(f.read_text()) for f in (bits, sampled)]
    return loaded[0], loaded[1], json.loads(scored.read_text()) if benchmark else None


def check_eval_settings(cfg: RunConfig) -> lmeval.TaskManager | None:
    """The lm-eval task manager when tasks are named, after checking that they exist (before anything is trained;
    the settings' values are checked with the rest of the config, in `config.validate`)."""
    return lmeval.task_manager(cfg.eval.tasks, cfg.eval.include_path) if cfg.eval.tasks else None


def print_report(out: Path) -> None:
    html_path, md_path = report.write_report(out)
    print(f"report: {html_path} (and {md_path.name})")
