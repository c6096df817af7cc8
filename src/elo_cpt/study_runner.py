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

Every cell runs in a fresh process (so its peak memory is its own) and writes `cells/NAME/result.json` last: a
rerun skips finished cells and resumes the unfinished one from its last checkpoint. Cells whose stage 1 is the
same share it (`stage1/KEY/`), so an alignment-budget sweep trains stage 1 once.

    DIR/study.yaml                 the study as given
    DIR/stage1/KEY/                a shared stage 1: its data, the trained shallow model, the merged model
    DIR/cells/NAME/cell.json       the cell, its resolved config and budget (a rerun that changes them is refused)
    DIR/cells/NAME/result.json     tokens, FLOPs, seconds (of every invocation), resumes, peak memory and bits/char of the cell
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
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from elo_cpt import checkpoint, config as config_mod, costmodel, distributed, emulation, files, layerprobe, pipeline, pipeline_eval, surgery, train
from elo_cpt.config import RunConfig
from elo_cpt.errors import EloError
from elo_cpt.stageclock import Timings

METHODS = ("base", "elo", "control", "fft", "lora", "freeze")
BUDGETS = ("tokens", "flops")
RESULT = "result.json"


@dataclass
class Cell:
    """One run of a study."""

    name: str
    """Unique name; also the cell's folder name."""
    method: str
    """base, elo, control, fft, lora or freeze."""
    group: str = ""
    """The results table this cell appears in (e.g. `layer sets`); cells without one go in the main table."""
    set: dict = field(default_factory=dict)
    """Run-config values of this cell on top of the study's `run` section, dotted keys allowed (stage1.lr: 5e-5)."""
    budget: str = "tokens"
    """Baselines: match the reference ELO cell's training tokens (`tokens`) or its cost-model FLOPs (`flops`)."""
    reference: str = "elo"
    """The ELO cell whose budget a baseline matches, or whose alignment a control repeats."""
    note: str = ""
    """A few words shown beside the cell in the results."""


@dataclass
class Study:
    """A study file: the shared run config and the cells."""

    run: dict
    cells: list[Cell]
    keep_models: bool = False
    """Keep each cell's final model folder (by default it is deleted once evaluated; results stay)."""

    def cell(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise EloError(f"the study has no cell named {name!r}; cells: {', '.join(c.name for c in self.cells)}")


log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)


def builtin_studies() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("elo_cpt").joinpath("studies").iterdir()
                  if p.name.endswith(".yaml"))


def study_path(spec: str | Path) -> Path:
    """A study file: a path, or the name of a built-in study (`de`, `ko`)."""
    path = Path(spec)
    if path.is_file():
        return path
    if str(spec) in builtin_studies():
        return Path(str(resources.files("elo_cpt").joinpath("studies", f"{spec}.yaml")))
    raise EloError(f"study file {spec} does not exist; give a YAML file or a built-in study ({', '.join(builtin_studies())})")


def load_study(spec: str | Path | dict) -> Study:
    """Parse and check a study file (or its already-parsed dict): every cell resolves before anything runs."""
    if isinstance(spec, dict):
        values = spec
    else:
        path = study_path(spec)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise EloError(f"study file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict) or not isinstance(values.get("cells"), list) or not values["cells"]:
        raise EloError("a study file needs `cells:`, a list of {name, method, ...}; see `elo study --help`")
    unknown = set(values) - {"run", "cells", "keep_models"}
    if unknown:
        raise EloError(f"unknown study key(s) {sorted(unknown)}; use run, cells, keep_models")
    known = {f.name for f in dataclasses.fields(Cell)}
    cells = []
    for raw in values["cells"]:
        if not isinstance(raw, dict) or not {"name", "method"} <= set(raw) or set(raw) - known:
            raise EloError(f"bad study cell {raw!r}: give name and method, and only {', '.join(sorted(known))}")
        cells.append(Cell(**{**raw, "name": str(raw["name"])}))
    study = Study(run=values.get("run") or {}, cells=cells, keep_models=bool(values.get("keep_models", False)))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise EloError(f"study cell names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    for cell in cells:
        if not cell.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise EloError(f"study cell name {cell.name!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
        if cell.method not in METHODS:
            raise EloError(f"cell {cell.name}: unknown method {cell.method!r}; use one of {', '.join(METHODS)}")
        if cell.budget not in BUDGETS:
            raise EloError(f"cell {cell.name}: budget must be tokens or flops, not {cell.budget!r}")
        if cell.method in ("control", "fft", "lora", "freeze"):
            reference = study.cell(cell.reference)
            if reference.method != "elo":
                raise EloError(f"cell {cell.name}: its reference {cell.reference!r} must be an elo cell")
        cell_config(study, cell)
    return study


def cell_config(study: Study, cell: Cell) -> RunConfig:
    """The run config of a cell: the study's `run` section, then the cell's `set` values."""
    try:
        cfg = config_mod.from_dict(study.run, cell.set)
    except EloError as err:
        raise EloError(f"cell {cell.name}: {err}") from None
    unsupported = {"vocab.add": cfg.vocab.add, "chat.base": cfg.chat.base, "sft.data": cfg.sft.data}
    if ignored := next((key for key, given in unsupported.items() if given), None):
        raise EloError(f"cell {cell.name}: {ignored} is not supported in a study (no vocabulary extension or stage 3 in cells); use elo run")
    return cfg


# ------------------------------------------------------------------ budgets


def _shape(cfg: RunConfig) -> costmodel.Shape:
    from transformers import AutoConfig

    return costmodel.Shape.from_config(AutoConfig.from_pretrained(checkpoint.require_model_dir(cfg.model, weights=False)))


def _planned_layers(cfg: RunConfig, n_layers: int) -> list[int]:
    """The layers a cell trains, for its cost; `layers: probe:K` is not measured yet, so the first K - K // 2 and the
    last K // 2 layers stand in (0,-1 for K = 2)."""
    k = config_mod.probe_size(cfg.layers)
    if k is None:
        return surgery.resolve_layers(cfg.layers, n_layers)
    k = min(k, n_layers)
    return sorted({*range(k - k // 2), *range(n_layers - k // 2, n_layers)})


def elo_plan(cfg: RunConfig) -> dict:
    """Tokens and cost-model FLOPs of an ELO run: stage 1 on the shallow model, then alignment on the whole one."""
    shape = _shape(cfg)
    layers = _planned_layers(cfg, shape.num_layers)
    frozen = surgery.resolve_layers(cfg.stage1.frozen_layers, shape.num_layers) if cfg.stage1.frozen_layers else []
    stage1, align = cfg.stage1.tokens or 0, pipeline.align_tokens(cfg)
    distil = 0.0
    if cfg.stage1.emulator_layers:  # the emulator's layers run in stage 1, frozen; distilling them costs once
        gap, frozen = emulation.emulator_sources(layers, shape.num_layers, cfg.stage1.emulator_layers)
        distil = min(cfg.stage1.emulator_tokens, stage1) * costmodel.emulator_flops_per_token(shape, layers, gap, frozen)
    align_method = {"fft": "align"}.get(cfg.align.method, cfg.align.method)
    flops = (stage1 * costmodel.step_cost(shape, "elo", layers, cfg.align.lora_rank, frozen).flops_per_token
             + align * costmodel.step_cost(shape, align_method, layers, cfg.align.lora_rank).flops_per_token
             # fitting bridges is one forward pass of the full model over their calibration tokens
             + (min(config_mod.bridge_token_count(cfg.stage1.bridge_tokens, shape.hidden), stage1)
                if pipeline.wants_bridges(cfg) else 0) * costmodel.step_cost(shape, "fft", layers).forward_flops + distil)
    return {"stage1_tokens": stage1, "align_tokens": align, "tokens": stage1 + align, "flops": flops}


def plan(study: Study, cell: Cell) -> dict:
    """What a cell trains: tokens per stage and cost-model FLOPs, before anything runs."""
    cfg = pipeline.resolve_defaults(cell_config(study, cell))
    if cell.method == "base":
        return {"tokens": 0, "flops": 0.0}
    if cell.method == "elo":
        return elo_plan(cfg)
    reference = elo_plan(pipeline.resolve_defaults(cell_config(study, study.cell(cell.reference))))
    shape = _shape(cfg)
    layers = _planned_layers(cfg, shape.num_layers)
    if cell.method == "control":
        per_token = costmodel.step_cost(shape, "fft", layers).flops_per_token
        return {"tokens": reference["align_tokens"], "flops": reference["align_tokens"] * per_token}
    per_token = costmodel.step_cost(shape, cell.method, layers, cfg.align.lora_rank).flops_per_token
    if cell.budget == "tokens":
        tokens = reference["tokens"]
    else:  # whole sequences, as many as the reference's FLOPs pay for
        tokens = int(reference["flops"] / per_token) // cfg.seq_len * cfg.seq_len
    return {"tokens": tokens, "flops": tokens * per_token}


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


def _shared_stage1(cfg: RunConfig, root: Path) -> tuple[Path, dict]:
    """Stage 1 and write-back of an ELO config, shared by every cell with the same stage-1 settings."""
    settings = {"model": cfg.model, "layers": cfg.layers, "stage1": dataclasses.asdict(cfg.stage1), "seq_len": cfg.seq_len,
                "seed": cfg.seed, "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "eval"}}
    folder = root / "stage1" / _key(settings)
    if not (folder / "merged").is_dir():
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
    evaluated: dict[str, dict] = {}
    start = time.perf_counter()
    if cell.method == "base":
        evaluated["final"] = _evaluate(cfg, checkpoint.require_model_dir(cfg.model), out / "eval-base")
    elif cell.method == "elo":
        shared, stages["stage1"] = _shared_stage1(cfg, out)
        evaluated["merged"] = _evaluate(cfg, shared / "merged", shared / "eval-merged")
        if planned["align_tokens"]:
            align_data = distributed.main_only(_align_mixture, cfg, folder / "data")
            align_cfg = replace(cfg.align, tokens=planned["align_tokens"])
            stats = train.finetune(shared / "merged", [str(align_data)], model_dir, align_cfg, cfg.seq_len, cfg.seed,
                                   method=cfg.align.method, layers=cfg.layers)
            stages["align"] = stats.to_dict()
            evaluated["final"] = _evaluate(cfg, model_dir, folder / "eval-final")
        else:
            evaluated["final"] = evaluated["merged"]
    else:
        if cell.method == "control":
            ref_cfg = distributed.main_only(pipeline.resolve_defaults, cell_config(parsed, parsed.cell(cell.reference)))
            corpus = distributed.main_only(_align_mixture, ref_cfg, folder / "data")
            method, train_cfg = "fft", replace(ref_cfg.align, tokens=planned["tokens"])
        else:
            budget = replace(cfg, stage1=replace(cfg.stage1, tokens=planned["tokens"]), align=replace(cfg.align, tokens=0))
            corpus = distributed.main_only(_mixtures, budget, folder / "data", ("stage1",))["stage1"]
            method, train_cfg = cell.method, replace(cfg.align, tokens=planned["tokens"])
        stats = train.finetune(cfg.model, [str(corpus)], model_dir, train_cfg, cfg.seq_len, cfg.seed, method=method, layers=cfg.layers)
        stages["train"] = stats.to_dict()
        evaluated["final"] = _evaluate(cfg, model_dir, folder / "eval-final")
    result = {
        "name": name,
        "method": cell.method,
        "group": cell.group,
        "budget": cell.budget if cell.method in ("fft", "lora", "freeze") else None,
        "note": cell.note,
        "set": cell.set,
        "tokens": sum(s["tokens"] for s in stages.values()),
        "flops": planned["flops"],
        "train_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "resumes": sum(s.get("resumes", 0) for s in stages.values()),  # its train seconds count every invocation
        "peak_rss_bytes": max((s["peak_rss_bytes"] for s in stages.values()), default=None),
        "stages": {k: {key: v for key, v in s.items() if key != "losses"} for k, s in stages.items()},
        "eval": {model: {lang: r["bits_per_char"] for lang, r in langs.items()} for model, langs in evaluated.items()},
        "cell_seconds": round(time.perf_counter() - start, 1),
    }
    distributed.main_only(_finish_cell, folder, result, None if parsed.keep_models else model_dir)
    return result


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
