"""Typed configuration of an ELO run: one YAML file plus `key=value` overrides (dotted keys for sections).

A leaf module. Every field carries a docstring; `describe()` lists them for `elo run --show-config`. Why plain
dataclasses rather than jsonargparse, OmegaConf or pydantic: docs/design.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from elo_cpt.errors import EloError

#: `stage1.bridge_tokens: auto`: enough calibration tokens for the model's width (see `bridge_token_count`).
AUTO = "auto"
#: Training precisions, with Lightning's names; `auto` resolves to one of the others on the hardware at hand.
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "bf16-true")
#: Optimizers by their config name. `adamw_kahan` keeps bf16 weights' small updates (Kahan summation).
OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_kahan")
#: Experiment trackers `report_to` can name (transformers' integrations), and `none`.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "neptune", "none")
#: Why bf16-true is refused with a plain optimizer (shared by the config and the training commands).
BF16_TRUE_NEEDS = ("needs optimizer adamw_kahan: with bf16 weights, an AdamW step of about lr is below half a bf16 "
                   "ulp of most weights and rounds away; use precision bf16-mixed (fp32 master weights) instead, "
                   "or optimizer adamw_kahan (pip install torch-optimi)")


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    tokens: int | None = None
    """Training tokens for this stage (sequences x seq_len); None means one pass over the stage's data."""
    lr: float = 5e-5
    """Peak learning rate."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up (any transformers scheduler name: cosine, linear, constant, ...)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up from zero."""
    batch_size: int = 4
    """Sequences per optimizer step and process (before gradient accumulation)."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    optimizer: str = "adamw"
    """`adamw` (PyTorch AdamW), `adamw_8bit` (bitsandbytes' 8-bit AdamW, the paper's; needs bitsandbytes) or
    `adamw_kahan` (torch-optimi's AdamW with Kahan-summed updates, which bf16-true needs; needs torch-optimi)."""
    precision: str = AUTO
    """32-true (fp32 throughout), bf16-mixed (fp32 master weights and optimizer state, bf16 autocast compute),
    bf16-true (bf16 weights; only with optimizer adamw_kahan, since plain AdamW steps of about lr round away in
    bf16), or auto: bf16-mixed on a GPU with bf16, else 32-true. The saved model keeps its input's dtype."""
    loss_chunk: int = 1024
    """Token positions per chunk of the vocabulary loss, so the full logits never exist at once; 0 computes them whole."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    lora_rank: int = 16
    """Rank of the LoRA adapters (LoRA baseline only)."""
    logging_steps: int = 0
    """Log the training loss every this many optimizer steps; 0 logs about 20 times per stage."""
    eval_steps: int = 0
    """Also log the loss on held-out text every this many optimizer steps and at the end, through Trainer's
    evaluation loop (elo run: data.eval's texts; stage commands: --eval-text; the first 20,000 characters of each);
    0 turns it off. Each evaluation costs a forward pass over the held-out text."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, through transformers' integrations: tensorboard (the stage's logs/ folder), wandb, mlflow,
    comet_ml, clearml, dvclive or neptune (each needs its package and its usual environment variables); none for none."""


@dataclass
class Stage1Config(TrainConfig):
    """ELO stage 1: train only the selected layers of the shallow model."""

    tokens: int | None = None
    """Stage-1 training tokens (target and replay together). Unset: 160,000 on the embedded demo corpora; with your own
    data.target, one pass over the stage-1 part of your corpora at their shares (the corpus that runs out first
    decides), counted when the run starts and stated in its log."""
    lr: float = 1.5e-5
    """Peak learning rate of the selected layers (the paper uses 5e-6 at 8B scale; see docs for the evidence)."""
    frozen_layers: str = ""
    """Extra layers kept in the shallow model but frozen and not written back (e.g. 10,20): they narrow the gap
    between the contexts the trained layers see in stage 1 and after the write-back, at their compute cost."""
    train_norm: bool = False
    """Also train the final norm in stage 1 (written back with the layers); the paper keeps it frozen."""
    bridge_tokens: int | str = AUTO
    """Fit frozen linear "bridges" for the removed layers on this many stage-1 tokens (a least-squares map between
    the residual streams the full model has on either side of each gap) and apply them in stage 1: `auto` takes
    max(4096, 4 x hidden size), 0 turns them off (the paper's method). Costs one forward pass of the full model
    over these tokens; see docs/results.md for the evidence."""


@dataclass
class AlignConfig(TrainConfig):
    """ELO alignment: full fine-tuning of the merged model on a small, disjoint bilingual set."""

    tokens: int | None = None
    """Alignment tokens; None takes token_ratio x stage1.tokens."""
    token_ratio: float = 0.1
    """Alignment tokens as a fraction of stage-1 tokens (the paper: about 1 GB after 9 GB); used when tokens is None."""
    lr: float = 5e-5
    """Peak learning rate of the full fine-tune."""
    method: str = "fft"
    """fft (the paper: every parameter), freeze (only the stage-1 layers; far less optimizer memory) or lora."""


@dataclass
class DataConfig:
    """Where the text comes from. Empty lists use the embedded default (German target, English replay)."""

    target: list[str] = field(default_factory=list)
    """Target-language training corpora, each SOURCE[#FIELD]: a .txt, .jsonl or .parquet file, a folder, a glob, a
    save_to_disk folder or hf:NAME[:CONFIG[:SPLIT]] (docs/data.md)."""
    english: list[str] = field(default_factory=list)
    """Replay corpora (English in the paper), same formats."""
    replay_language: str = "en"
    """Language code of the replay corpora: labels their share of the mixtures and the report's forgetting check."""
    english_share: float = 0.1
    """Share of English in the training mixture, by UTF-8 bytes (the paper: English:target = 1:9). With data.target
    given, data.english must be too unless this is 0, which trains on target text only."""
    align_holdout: float = 0.1
    """Fraction of each corpus's documents (its tail) reserved for alignment, so the two stages never share text."""
    eval: dict[str, str] = field(default_factory=dict)
    """Held-out evaluation text per language, e.g. {de: held_out_de.txt, en: held_out_en.txt}."""


@dataclass
class EvalConfig:
    """Bits-per-character evaluation on held-out text."""

    max_chars: int = 20_000
    """Characters of each evaluation text used (cut at a paragraph boundary); 0 means all of it."""
    batch_size: int = 8
    """Windows evaluated at once (also lm-eval's batch size)."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks, groups or tags run on the base and final models, e.g. [kobest_copa, mmlu]; empty runs none."""
    include_path: str | None = None
    """Folder of extra lm-eval task YAML files (local tasks), as `lm_eval --include_path`."""
    limit: int | None = None
    """At most this many examples per lm-eval task (quick checks; scores on a subset); None runs them all."""
    prompts: dict[str, list[str]] = field(default_factory=dict)
    """Generation-sample prompts per language, e.g. {ko: ["서울은"]}; de and en have built-in prompts, other languages get none."""
    sample_tokens: int = 40
    """New tokens generated greedily per sample prompt for base, merged and final; 0 turns samples off."""
    english_tolerance_pct: float = 1.0
    """The report flags English bits/char of the final model worse than the base's by more than this many percent."""


@dataclass
class RunConfig:
    """The whole ELO pipeline: stage 1, write-back, alignment and evaluation."""

    model: str | None = None
    """Hugging Face model folder (safetensors); None uses the embedded default SmolLM2-135M-Instruct."""
    layers: str = "0,-1"
    """Decoder layers trained in stage 1: indices and start:stop ranges, negatives from the end (e.g. 0,-1 or 0,15,-1)."""
    target_language: str = "de"
    """Code of the target language, used to label results; with no data.target given it also picks the embedded
    corpora (de: German, ko: Korean)."""
    seq_len: int = 256
    """Tokens per training sequence and evaluation window."""
    seed: int = 0
    """Seed for data order and initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """ELO stage-1 settings."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Alignment settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    control: bool = False
    """Also align the base model alone (the same alignment data, budget and settings, no stage 1) and evaluate it, so
    the report shows stage 1's own contribution on your data; costs one more alignment. Can be turned on for a
    finished run: only the control is then trained."""
    keep_intermediate: bool = True
    """Keep the weights of the intermediate models (stages/stage1, stages/merged, stages/control) once the run is
    evaluated; false deletes them, keeping their stats and provenance: the run folder then holds about one copy of
    the base model (model/) instead of two or three. A run evaluated again cannot re-evaluate a deleted model."""


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[stmt.target.id] = str(nxt.value.value)
    return docs


def describe(config: object | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, docstring) for every setting of `config` (default: the defaults), for help output."""
    config = RunConfig() if config is None else config
    rows = []
    docs = _field_docs(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows


def _coerce(value: object, annotation: object, key: str) -> object:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for arg in members:  # the first member that takes the value
            try:
                return _coerce(value, arg, key)
            except EloError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in members)
        raise EloError(f"config key {key!r} expects {names}, got {value!r}")
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        # YAML reads `1e-5` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if origin is list:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            return [_coerce(v, args[0], key) for v in value]
    if origin is dict and isinstance(value, dict):
        return {str(k): _coerce(v, args[1], key) for k, v in value.items()}
    expected = origin or annotation
    if isinstance(expected, type) and isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise EloError(f"config key {key!r} expects {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _apply(obj: object, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = ", ".join(sorted(f"{prefix}{n}" for n in names))
            raise EloError(f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise EloError(f"config key {key!r} is a section; set its fields, e.g. {key}.lr=1e-5")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def nest(flat: dict) -> dict:
    """Turn dotted keys (`stage1.lr: 1e-5`) into nested sections; nested values pass through."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return nested


def from_dict(*layers: dict) -> RunConfig:
    """A validated RunConfig from nested (or dotted) value dicts applied in order over the defaults."""
    config = RunConfig()
    for values in layers:
        _apply(config, nest(values or {}))
    validate(config)
    return config


def parse_overrides(pairs: list[str]) -> dict:
    """Turn `a.b=value` strings into a nested dict (through `nest`), values parsed as YAML scalars/lists."""
    flat: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise EloError(f"bad override {pair!r}; write key=value, e.g. stage1.lr=1e-5")
        flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return nest(flat)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config from an optional YAML file, then `key=value` overrides, validated against the dataclasses."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise EloError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise EloError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise EloError(f"config file {path} must be a mapping of keys to values")
        _apply(config, values)
    _apply(config, parse_overrides(overrides or []))
    validate(config)
    return config


#: How a whole model is fine-tuned (`elo finetune --method`, `align.method`): every parameter, only some layers, LoRA.
FINETUNE_METHODS = ("fft", "freeze", "lora")


def train_checks(train: TrainConfig, prefix: str = "", min_tokens: int = 1) -> list[tuple[bool, str]]:
    """(holds, message) for each setting of one training stage; `prefix` names the stage's section in messages."""
    return [
        (train.tokens is None or train.tokens >= min_tokens, f"{prefix}tokens must be >= {min_tokens} (or unset: one pass over the data)"),
        (train.lr > 0, f"{prefix}lr must be positive"),
        (train.batch_size >= 1 and train.grad_accum >= 1, f"{prefix}batch_size and {prefix}grad_accum must be >= 1"),
        (0 <= train.warmup_ratio < 1, f"{prefix}warmup_ratio must be in [0, 1)"),
        (train.save_steps >= 1, f"{prefix}save_steps must be >= 1 (a resumable checkpoint every N optimizer steps)"),
        (train.loss_chunk >= 0, f"{prefix}loss_chunk must be >= 0 (0 computes the full logits)"),
        (train.lora_rank >= 1, f"{prefix}lora_rank must be >= 1"),
        (train.weight_decay >= 0 and train.max_grad_norm >= 0, f"{prefix}weight_decay and {prefix}max_grad_norm must be >= 0"),
        (train.optimizer in OPTIMIZERS, f"{prefix}optimizer must be one of {', '.join(OPTIMIZERS)}, not {train.optimizer!r}"),
        (train.precision in PRECISIONS, f"{prefix}precision must be one of {', '.join(PRECISIONS)}, not {train.precision!r}"),
        (train.precision != "bf16-true" or train.optimizer == "adamw_kahan", f"{prefix}precision bf16-true {BF16_TRUE_NEEDS}"),
        (train.logging_steps >= 0, f"{prefix}logging_steps must be >= 0 (0: about 20 log points per stage)"),
        (train.eval_steps >= 0, f"{prefix}eval_steps must be >= 0 (0: no held-out loss during training)"),
        (set(train.report_to) <= set(TRACKERS), f"{prefix}report_to takes some of {', '.join(TRACKERS)}, not {train.report_to!r}"),
    ]


def validate_train(train: TrainConfig, seq_len: int | None = None) -> None:
    """Reject settings of a single training command (`elo pretrain`, `align`, `finetune`) that cannot work."""
    for ok, message in train_checks(train):
        if not ok:
            raise EloError(message)
    if seq_len is not None:
        check_seq_len(seq_len)


def check_seq_len(seq_len: int) -> None:
    """Reject a `--seq-len` of a single command (training, bridges, evaluation) that cannot work."""
    if seq_len < 1:
        raise EloError(f"--seq-len must be at least 1 token, not {seq_len}")


def validate(config: RunConfig) -> None:
    """Reject values that cannot work, before any expensive step starts."""
    checks = [
        (config.seq_len >= 8, "seq_len must be at least 8"),
        (0 <= config.data.english_share < 1, "data.english_share must be in [0, 1)"),
        (0 < config.data.align_holdout < 1, "data.align_holdout must be in (0, 1)"),
        (config.align.token_ratio >= 0, "align.token_ratio must be >= 0"),
        (config.eval.max_chars >= 0, "eval.max_chars must be >= 0 (0 means all)"),
        (config.align.method in FINETUNE_METHODS, f"align.method must be one of {', '.join(FINETUNE_METHODS)}"),
        (config.eval.sample_tokens >= 0, "eval.sample_tokens must be >= 0 (0 turns generation samples off)"),
        (config.eval.limit is None or config.eval.limit >= 1, "eval.limit must be at least 1, or empty to run every example"),
        (config.eval.english_tolerance_pct >= 0, "eval.english_tolerance_pct must be >= 0"),
        (not config.control or config.align.tokens != 0 and (config.align.tokens or config.align.token_ratio > 0),
         "control=true aligns the base model alone to compare with ELO, but the alignment budget is 0; give "
         "align.tokens (or align.token_ratio), or turn control off"),
        (config.stage1.bridge_tokens == AUTO or (isinstance(config.stage1.bridge_tokens, int) and config.stage1.bridge_tokens >= 0),
         f"stage1.bridge_tokens must be a token count >= 0 (0 turns bridges off) or {AUTO}, not {config.stage1.bridge_tokens!r}"),
    ]
    checks += train_checks(config.stage1, "stage1.") + train_checks(config.align, "align.", min_tokens=0)  # 0: no alignment
    for ok, message in checks:
        if not ok:
            raise EloError(message)


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def flatten(values: dict) -> dict:
    """A config dict with its sections as dotted keys, one level deep ({"stage1": {"lr": 1e-5}} -> {"stage1.lr": 1e-5});
    settings whose values are dicts (data.eval) stay whole."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every setting two (nested) config dicts disagree on, in key order."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def bridge_token_count(setting: int | str, hidden_size: int) -> int:
    """The calibration tokens `stage1.bridge_tokens` asks for on a model of this width: `auto` is max(4096, 4 x
    hidden size), since each output of the least-squares fit has hidden size + 1 unknowns."""
    return max(4096, 4 * hidden_size) if setting == AUTO else int(setting)


def elo_version() -> str:
    """The installed elo-cpt's version (recorded in metrics.json; `elo --version`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("elo-cpt")
    except PackageNotFoundError:
        return "unknown"
