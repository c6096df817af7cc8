"""The cells of an `elo study`: the study file parsed and checked, each cell's run config, and what each cell trains
(tokens per stage and cost-model FLOPs) before anything runs; `study_runner` runs them.

A cell with `vocab.add` trains from the model `elo vocab` extends (once per base model and vocab settings, shared by
the cells that ask for the same): its budget counts the extended tokenizer's tokens, and its FLOPs the larger head.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from elo_cpt import checkpoint, config as config_mod, costmodel, emulation, pipeline, surgery
from elo_cpt.config import RunConfig
from elo_cpt.errors import EloError

METHODS = ("base", "elo", "control", "fft", "lora", "freeze")
BUDGETS = ("tokens", "flops")


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
            if cell.method == "control" and cell_config(study, cell).vocab != cell_config(study, reference).vocab:
                raise EloError(f"cell {cell.name}: a control repeats the alignment of {reference.name} from the model it "
                               f"starts from, so its vocab.* settings must be {reference.name}'s; set the same in both")
        cell_config(study, cell)
    return study


def cell_config(study: Study, cell: Cell) -> RunConfig:
    """The run config of a cell: the study's `run` section, then the cell's `set` values."""
    try:
        cfg = config_mod.from_dict(study.run, cell.set)
    except EloError as err:
        raise EloError(f"cell {cell.name}: {err}") from None
    unsupported = {"chat.base": cfg.chat.base, "sft.data": cfg.sft.data}
    if ignored := next((key for key, given in unsupported.items() if given), None):
        raise EloError(f"cell {cell.name}: {ignored} is not supported in a study (no stage 3 in cells); use elo run")
    return cfg


# ------------------------------------------------------------------ budgets


def _shape(cfg: RunConfig) -> costmodel.Shape:
    """The cost model's view of the model a cell trains: with vocab.add, the extended one (its head has the new rows,
    which `elo vocab` puts after both the tokenizer's ids and the embedding's rows)."""
    from transformers import AutoConfig

    model = checkpoint.require_model_dir(cfg.model, weights=False)
    shape = costmodel.Shape.from_config(AutoConfig.from_pretrained(model))
    if not cfg.vocab.add:
        return shape
    return dataclasses.replace(shape, vocab=max(shape.vocab, _tokenizer_length(str(model))) + cfg.vocab.add)


@functools.lru_cache(maxsize=8)
def _tokenizer_length(model: str) -> int:
    return len(checkpoint.load_tokenizer(model))


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
                if pipeline.wants_bridges(cfg) else 0) * costmodel.step_cost(shape, "fft", layers).forward_flops + distil
             # training the new vocabulary rows: the head's weight gradient, the whole vocabulary's (the old rows' is
             # zeroed after it is computed)
             + (stage1 * 2.0 * shape.head_params if cfg.stage1.train_new_rows else 0))
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

