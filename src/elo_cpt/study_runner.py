"""`elo study`: the paper's comparisons in miniature, as a resumable grid of runs on the same corpora and evaluation.

A study file (YAML) gives the run config every cell starts from and the cells:

    run:                                   # RunConfig values, as in an `elo run` config file
      stage1: {tokens: 64000}
    cells:
      - {name: base, method: base}
      - {name: elo, method: elo}
      - {name: align-only, method: control}
      - {name: fft-tokens, method: fft, budget: tokens}
      - {name: fft-flops, method: fft, budget: flops}
      - {name: elo-lr5e-5, method: elo, set: {stage1.lr: 5.0e-5}, group: stage-1 learning rate}

Methods:
    base                 the untrained model, evaluated
    elo                  stage 1, write-back and alignment; its merged model (before alignment) is evaluated too
    control              alignment only: the reference ELO cell's alignment, on the same data, from the base model
    fft | lora | freeze  a baseline from the base model on the stage-1 corpora with the reference ELO cell's tokens
                         (`budget: tokens`) or cost-model FLOPs (`budget: flops`), optimiser settings from `align`

With `vocab.add` (e.g. `set: {vocab.add: 8000, stage1.train_new_rows: true}`), "the base model" is the model `elo
vocab` extends, built once per base model and vocab settings (`vocab/KEY/`) and shared; a control's vocab settings
are its reference's. Every cell records the characters of text its tokens hold (tokens per character of its mixtures).

Every cell runs in a fresh process (so its peak memory is its own) and writes `cells/NAME/result.json` last: a
rerun skips finished cells and resumes the unfinished one from its last checkpoint. Cells whose stage 1 is the
same share it (`stage1/KEY/`), so an alignment-budget sweep trains stage 1 once.

    DIR/study.yaml                 the study as given
    DIR/vocab/KEY/model/           a shared vocabulary extension (vocab.add): the extended model
    DIR/stage1/KEY/                a shared stage 1: its data, the trained shallow model, the merged model
    DIR/cells/NAME/cell.json       the cell, its resolved config and budget (a rerun that changes them is refused)
    DIR/cells/NAME/result.json     tokens, characters, FLOPs, seconds (of every invocation), resumes, peak memory and
                                   bits/char of the cell
    DIR/results.json, .md, .png    the results table and plot
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from elo_cpt import checkpoint, config as config_mod, corpus, data, distributed, files, layerprobe, pipeline, pipeline_eval
from elo_cpt import train, vocabulary
from elo_cpt.config import RunConfig
from elo_cpt.errors import EloError
from elo_cpt.stageclock import Timings
# the study file, its cells and their budgets (re-exported: `elo study --list` and the tests reach them here)
from elo_cpt.study_cells import (BUDGETS, METHODS, Cell, Study, _shape, builtin_studies, cell_config, elo_plan,  # noqa: F401
                                 load_study, plan, study_path)

RESULT = "result.json"


log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)


# ------------------------------------------------------------------ running


def study(spec: str | Path | dict, out: str | Path, cells: list[str] | str | None = None, launch: str | None = None) -> dict:
    """Run the study `spec` (a YAML file or built-in name) into `out`, skipping finished cells; return the results.

    Each cell runs in a process of its own, started by `launch` when given (e.g. `torchrun --nproc_per_node 8`:
    the cell then trains on every process, and its main process alone writes)."""
    if distributed.world_size() > 1:
        raise EloError("elo study starts one process per cell itself; run it in one process and give "
                       "--launch 'torchrun --nproc_per_node N' to train each cell on N")
    parsed = load_study(spec)
    out = Path(out)
    wanted = [c.strip() for c in cells.split(",")] if isinstance(cells, str) else cells
    chosen = [parsed.cell(name) for name in wanted] if wanted else parsed.cells
    if out.exists() and any(out.iterdir()) and not (out / "study.yaml").is_file():
        raise EloError(f"{out} exists and is not a study folder; choose another --out")
    plans = {cell.name: plan(parsed, cell) for cell in parsed.cells}
    for cell in chosen:  # refuse a changed cell before any work
        recorded = out / "cells" / cell.name / "cell.json"
        if recorded.is_file():
            changed = _changes(json.loads(recorded.read_text()), _record(parsed, cell, plans[cell.name]))
            if changed:
                raise EloError(f"{out} ran cell {cell.name} with other settings ({changed}); "
                               f"rename the cell or delete {recorded.parent}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.yaml").write_text(yaml.safe_dump({"run": parsed.run, "cells": [dataclasses.asdict(c) for c in parsed.cells],
                                                    "keep_models": parsed.keep_models}, sort_keys=False, allow_unicode=True))
    failed = []
    for index, cell in enumerate(chosen, 1):
        folder = out / "cells" / cell.name
        if (folder / RESULT).is_file():
            log(f"cell {index}/{len(chosen)} {cell.name}: done")
            continue
        p = plans[cell.name]
        log(f"cell {index}/{len(chosen)} {cell.name}: {cell.method}, {p['tokens']:,} training tokens, "
            f"{p['flops'] / 1e12:.1f} TFLOPs (cost model)")
        folder.mkdir(parents=True, exist_ok=True)
        files.write_json(folder / "cell.json", _record(parsed, cell, p))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        launcher = shlex.split(launch) if launch else [sys.executable]
        proc = subprocess.run([*launcher, "-m", "elo_cpt.study_runner", str(out), cell.name], env=env)
        if proc.returncode != 0 or not (folder / RESULT).is_file():
            log(f"cell {cell.name} failed (exit {proc.returncode}); rerun the same command to retry it")
            failed.append(cell.name)
    results = collect(out)
    if failed:
        raise EloError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; the others are in {out / 'results.md'}")
    return results


# Settings that cannot change a cell's numbers: a study may change them (or their defaults) and still resume.
_RESULT_NEUTRAL = {f"{stage}.{key}" for stage in ("stage1", "align") for key in ("save_steps", "logging_steps", "report_to")} | {
    "eval.batch_size", "eval.sample_tokens", "eval.prompts", "eval.english_tolerance_pct"}


def _record(parsed: Study, cell: Cell, cell_plan: dict) -> dict:
    """What `cells/NAME/cell.json` records: the cell as written, its whole resolved config (so a changed `run`
    section or a changed default is noticed too, not only a changed cell) and its budget."""
    resolved = config_mod.flatten(config_mod.to_dict(cell_config(parsed, cell)))
    config = {k: v for k, v in resolved.items() if k not in _RESULT_NEUTRAL}
    return {"cell": dataclasses.asdict(cell), "config": config, "plan": cell_plan}


def _changes(recorded: dict, current: dict) -> str:
    """What makes a finished cell's results stale, e.g. `stage1.lr: 1.5e-05 -> 5e-05`; empty when nothing does.
    Cells recorded before configs were recorded are compared by their entry and token budget only."""
    if recorded["cell"] != current["cell"]:
        return "its entry in the study file changed"
    old = recorded.get("config")
    if old is not None:
        # keys in both only: a setting added or removed since keeps the old behaviour by its default
        keys = sorted((set(old) & set(current["config"])) - _RESULT_NEUTRAL)
        diffs = [f"{k}: {old[k]!r} -> {current['config'][k]!r}" for k in keys if old[k] != current["config"][k]]
        if diffs:
            return "; ".join(diffs)
    if recorded.get("plan", {}).get("tokens") != current["plan"]["tokens"]:
        return f"training tokens {recorded['plan']['tokens']:,} -> {current['plan']['tokens']:,}"
    return ""


def _key(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _mixtures(cfg: RunConfig, folder: Path, parts: tuple[str, ...]) -> dict[str, Path]:
    """The cell's stage-1 and/or alignment mixtures (as `elo run` builds them), written once to `folder`."""
    paths = {part: folder / f"{part}.jsonl" for part in parts}
    if not all(p.is_file() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        pipeline.write_mixtures(cfg, folder, tuple(part for part, p in paths.items() if not p.is_file()))
    return paths


def _align_mixture(cfg: RunConfig, folder: Path) -> Path:
    """The alignment mixture `elo run` would train on (stage 1's is not needed, so it is not built)."""
    only_align = replace(cfg, stage1=replace(cfg.stage1, tokens=0), align=replace(cfg.align, tokens=pipeline.align_tokens(cfg)))
    return _mixtures(only_align, folder, ("align",))["align"]


def _vocab_settings(cfg: RunConfig) -> dict:
    """What a vocabulary extension depends on: the base model, the number of tokens, their corpora and rule."""
    return {"model": cfg.model, "add": cfg.vocab.add, "data": cfg.vocab.data or cfg.data.target,
            "ascii_context": cfg.vocab.ascii_context}


def _extended(cfg: RunConfig, root: Path) -> RunConfig:
    """`cfg` with the model its cell trains: with vocab.add, the model `elo vocab` extends into `vocab/KEY/model`,
    once for every cell with the same base model and vocab settings (main process)."""
    if not cfg.vocab.add:
        return cfg
    settings = _vocab_settings(cfg)
    folder = root / "vocab" / _key(settings)
    if not (folder / "model").is_dir():
        distributed.main_only(_extend, settings, folder)
    return replace(cfg, model=str(folder / "model"))


def _extend(settings: dict, folder: Path) -> None:
    log(f"extending the vocabulary of {settings['model']} by {settings['add']:,} tokens (shared as {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / "settings.json", settings)
    vocabulary.extend_vocabulary(settings["model"], settings["data"], settings["add"], folder / "model",
                                 ascii_context=settings["ascii_context"])


def _shared_stage1(cfg: RunConfig, root: Path) -> tuple[Path, dict]:
    """Stage 1 and write-back of an ELO config, shared by every cell with the same stage-1 settings (with vocab.add,
    from the extended model, and the vocab settings in the key)."""
    stage1 = dataclasses.asdict(cfg.stage1)
    if stage1["new_rows_lr"] is None:  # a setting added since, at its default: stage 1s trained before keep their key
        del stage1["new_rows_lr"]
    settings = {"model": cfg.model, "layers": cfg.layers, "stage1": stage1, "seq_len": cfg.seq_len,
                "seed": cfg.seed, "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "eval"},
                **({"vocab": _vocab_settings(cfg)} if cfg.vocab.add else {})}
    folder = root / "stage1" / _key(settings)
    if not (folder / "merged").is_dir():
        cfg = _extended(cfg, root)
        stage1_data = distributed.main_only(_stage1_mixture, cfg, folder, settings)
        pipeline.stage1_and_merge(cfg, stage1_data, folder, Timings(folder / "timings.json", write=distributed.is_main()))
    return folder, json.loads((folder / "stage1" / train.STATS_FILE).read_text())


def _stage1_mixture(cfg: RunConfig, folder: Path, settings: dict) -> Path:
    """The shared stage 1's mixture (main process), written once with the settings it was built for."""
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / "settings.json", settings)
    return _mixtures(replace(cfg, align=replace(cfg.align, tokens=0)), folder / "data", ("stage1",))["stage1"]


def _evaluate(cfg: RunConfig, model_dir: Path, cache: Path) -> dict:
    """Bits/char per language of a model folder, by `elo run`'s own evaluation step (main process; no samples and
    no lm-eval), cached in a folder beside `cache` named for the evaluation settings."""
    settings = {"eval": cfg.data.eval, "max_chars": cfg.eval.max_chars, "seq_len": cfg.seq_len}
    folder = cache.with_name(f"{cache.name}-{_key(settings)}")
    bits_only = replace(cfg, eval=replace(cfg.eval, sample_tokens=0, tasks=[]))
    timings = Timings(folder / "timings.json", write=False)
    name = cache.name.removeprefix("eval-")  # base, merged or final
    return distributed.main_only(pipeline_eval.evaluate_model, bits_only, name, model_dir, folder, timings, None)[0]


def run_cell(out: str | Path, name: str) -> dict:
    """Run one cell of the study in `out` (the study must have been started by `study`); write its result."""
    out = Path(out)
    parsed = load_study(yaml.safe_load((out / "study.yaml").read_text()))
    cell = parsed.cell(name)
    folder = out / "cells" / name
    planned = json.loads((folder / "cell.json").read_text())["plan"]
    cfg = distributed.main_only(pipeline.resolve_defaults, cell_config(parsed, cell))
    cfg = distributed.main_only(layerprobe.probe_layers, cfg, folder)  # `layers: probe`: measured once per cell
    model_dir = folder / "model"
    stages: dict[str, dict] = {}
    mixtures: dict[str, Path] = {}  # the text each stage trained on
    evaluated: dict[str, dict] = {}
    start = time.perf_counter()
    trained = _extended(cfg, out)  # the model the cell starts from (and tokenizes with): the extended one with vocab.add
    if cell.method == "base":  # with vocab.add, the extended model as `elo vocab` left it
        cache = Path(trained.model).parent if cfg.vocab.add else out
        evaluated["final"] = _evaluate(cfg, checkpoint.require_model_dir(trained.model), cache / "eval-base")
    elif cell.method == "elo":
        shared, stages["stage1"] = _shared_stage1(cfg, out)
        mixtures["stage1"] = shared / "data" / "stage1.jsonl"
        evaluated["merged"] = _evaluate(cfg, shared / "merged", shared / "eval-merged")
        if planned["align_tokens"]:
            mixtures["align"] = distributed.main_only(_align_mixture, trained, folder / "data")
            align_cfg = replace(cfg.align, tokens=planned["align_tokens"])
            stats = train.finetune(shared / "merged", [str(mixtures["align"])], model_dir, align_cfg, cfg.seq_len, cfg.seed,
                                   method=cfg.align.method, layers=cfg.layers)
            stages["align"] = stats.to_dict()
            evaluated["final"] = _evaluate(cfg, model_dir, folder / "eval-final")
        else:
            evaluated["final"] = evaluated["merged"]
    else:
        if cell.method == "control":  # the reference's vocab settings are the cell's (load_study), so its model too
            ref_cfg = distributed.main_only(pipeline.resolve_defaults, cell_config(parsed, parsed.cell(cell.reference)))
            mixtures["train"] = distributed.main_only(_align_mixture, _extended(ref_cfg, out), folder / "data")
            method, train_cfg = "fft", replace(ref_cfg.align, tokens=planned["tokens"])
        else:
            budget = replace(trained, stage1=replace(cfg.stage1, tokens=planned["tokens"]), align=replace(cfg.align, tokens=0))
            mixtures["train"] = distributed.main_only(_mixtures, budget, folder / "data", ("stage1",))["stage1"]
            method, train_cfg = cell.method, replace(cfg.align, tokens=planned["tokens"])
        stats = train.finetune(trained.model, [str(mixtures["train"])], model_dir, train_cfg, cfg.seq_len, cfg.seed,
                               method=method, layers=cfg.layers)
        stages["train"] = stats.to_dict()
        evaluated["final"] = _evaluate(cfg, model_dir, folder / "eval-final")
    for stage, mixture in mixtures.items():  # characters of text = tokens / tokens per character of the stage's mixture
        rate = distributed.main_only(_tokens_per_char, trained.model, mixture)
        stages[stage].update(tokens_per_char=round(rate, 4), characters=round(stages[stage]["tokens"] / rate))
    result = {
        "name": name,
        "method": cell.method,
        "group": cell.group,
        "budget": cell.budget if cell.method in ("fft", "lora", "freeze") else None,
        "note": cell.note,
        "set": cell.set,
        "tokens": sum(s["tokens"] for s in stages.values()),
        "characters": sum(s["characters"] for s in stages.values()),
        "flops": planned["flops"],
        "train_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "resumes": sum(s.get("resumes", 0) for s in stages.values()),  # its train seconds count every invocation
        "peak_rss_bytes": max((s["peak_rss_bytes"] for s in stages.values()), default=None),
        "stages": {k: {key: v for key, v in s.items() if key != "losses"} for k, s in stages.items()},
        "eval": {model: {lang: r["bits_per_char"] for lang, r in langs.items()} for model, langs in evaluated.items()},
        # tokens per character of the held-out text, in the tokenizer of the model the cell trained
        "eval_tokens_per_char": {lang: round(r["tokens"] / r["chars"], 4) for lang, r in evaluated["final"].items()},
        "vocab": distributed.main_only(_vocab_summary, trained.model) if cfg.vocab.add else None,
        "cell_seconds": round(time.perf_counter() - start, 1),
    }
    distributed.main_only(_finish_cell, folder, result, None if parsed.keep_models else model_dir)
    return result


def _tokens_per_char(model: str | Path, mixture: Path) -> float:
    return data.tokens_per_char(corpus.iter_documents(mixture), checkpoint.load_tokenizer(model))


def _vocab_summary(model: str | Path) -> dict:
    """The extension a cell trained with: tokens added, vocabulary size, tokens per character of its corpora."""
    summary = json.loads((Path(model) / vocabulary.VOCAB_FILE).read_text())
    return {k: summary[k] for k in ("added", "vocab_size", "ascii_context", "tokens_per_char_before", "tokens_per_char_after")}


def _finish_cell(folder: Path, result: dict, drop: Path | None) -> None:
    files.write_json(folder / RESULT, result)
    if drop is not None:
        shutil.rmtree(drop, ignore_errors=True)


# ------------------------------------------------------------------ results


def collect(out: str | Path) -> dict:
    """Gather the finished cells into results.json, results.md and results.png."""
    from elo_cpt import study_report

    out = Path(out)
    parsed = load_study(yaml.safe_load((out / "study.yaml").read_text()))
    cfg = pipeline.resolve_defaults(config_mod.from_dict(parsed.run))
    rows = []
    for cell in parsed.cells:
        path = out / "cells" / cell.name / RESULT
        if path.is_file():  # FLOPs from the current cost model, so every cell is counted the same way
            rows.append({**json.loads(path.read_text()), "flops": plan(parsed, cell)["flops"]})
        else:
            rows.append({"name": cell.name, "method": cell.method, "group": cell.group, "missing": True})
    results = {"target_language": cfg.target_language, "model": cfg.model, "run": parsed.run,
               "machine": study_report.machine(), "cells": rows}
    files.write_json(out / "results.json", results)
    study_report.write(out, results)
    return results


if __name__ == "__main__":  # one cell in its own process: `python -m elo_cpt.study_runner STUDY_DIR CELL`
    distributed.setup_logging()
    try:
        run_cell(sys.argv[1], sys.argv[2])
    except EloError as err:
        print(f"elo: error: {err}", file=sys.stderr)
        sys.exit(1)
