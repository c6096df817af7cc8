"""Typed configuration of an ELO run: one YAML file plus `key=value` overrides (dotted keys for sections).

Every field carries a docstring; `describe()` lists them for `elo run --show-config`; `configparse` applies YAML values
and overrides. Why plain dataclasses rather than jsonargparse, OmegaConf or pydantic: docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from elo_cpt import configparse
from elo_cpt.configparse import apply_values, differences, flatten, nest, parse_overrides  # noqa: F401 (the API)
from elo_cpt.errors import EloError

#: `stage1.bridge_tokens: auto`: enough calibration tokens for the model's width (see `bridge_token_count`).
AUTO = "auto"
#: Training precisions, with Lightning's names; `auto` resolves to one of the others on the hardware at hand.
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "bf16-true")
#: Optimizers by their config name. `adamw_kahan` keeps bf16 weights' small updates (Kahan summation); adafactor,
#: adamw_8bit, galore and apollo keep less optimizer state than AdamW (docs/training.md, "Memory-lean optimizers").
OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_kahan", "adafactor", "galore", "apollo")
#: Optimizers `step_in_backward` can step one parameter at a time (galore's and apollo's projections and
#: bitsandbytes' embedding override are set up for the whole model by Trainer).
STEP_IN_BACKWARD_OPTIMIZERS = ("adamw", "adamw_kahan", "adafactor")
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
    """`adamw` (PyTorch AdamW), `adamw_8bit` (bitsandbytes' 8-bit AdamW, the paper's; needs bitsandbytes),
    `adamw_kahan` (torch-optimi's AdamW with Kahan-summed updates, which bf16-true needs; needs torch-optimi), or a
    memory-lean one: `adafactor` (factored second moment, no first moment), `galore` (GaLore's AdamW on low-rank
    projected gradients of the decoder layers' linear weights; needs galore-torch) or `apollo` (APOLLO: AdamW state
    in a random low-rank space, per-channel scaling; needs apollo-torch). Table: docs/training.md."""
    optimizer_rank: int = 128
    """Rank of galore's and apollo's projections (their own default, 128); other optimizers ignore it."""
    precision: str = AUTO
    """32-true (fp32 throughout), bf16-mixed (fp32 master weights and optimizer state, bf16 autocast compute),
    bf16-true (bf16 weights; only with optimizer adamw_kahan, since plain AdamW steps of about lr round away in
    bf16), or auto: bf16-mixed on a GPU with bf16, else 32-true. The saved model keeps its input's dtype."""
    loss_chunk: int = 1024
    """Token positions per chunk of the vocabulary loss, so the full logits never exist at once; 0 computes them whole."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    step_in_backward: bool = False
    """Step each parameter's optimizer as soon as its gradient is complete and free that gradient, so the whole
    model's gradients never exist at once (torchtune's optimizer-in-backward): less memory by about the trained
    weights' size. With adamw, adamw_kahan or adafactor; needs grad_accum 1 and one process, and clips no global
    gradient norm (max_grad_norm is ignored)."""
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
    train_new_rows: bool = False
    """Also train the embedding (and untied head) rows of the tokens vocab.add added, the old rows staying exactly as
    they are (no gradient, no weight decay); written back with the layers (docs/vocab.md). Needs vocab.add > 0, or a
    model extended by `elo vocab`."""
    new_rows_lr: float | None = None
    """Peak learning rate of the rows train_new_rows trains (an optimizer group of their own, on the layers' schedule;
    the old rows still stay exactly as they are); None: stage1.lr. Rows starting as their pieces' mean may want more."""
    probe_tokens: int = 8192
    """Tokens per language (target, and English when replayed) that `layers: probe` measures (docs/probe.md)."""
    emulator_layers: int = 0
    """Stand in for the removed middle with this many frozen layers, initialised from evenly spaced middle layers and
    distilled once to reproduce the middle's output (Offsite-Tuning's emulator; docs/probe.md); never written back.
    0 turns it off. Replaces the bridges (stage1.bridge_tokens is then ignored unless set to a count, an error)."""
    emulator_tokens: int = 65536
    """Stage-1 tokens the emulator is distilled on (one pass, no-grad teacher: the full model); cached under the
    cache root by base model, layers, emulator_layers and the distillation tokens."""


@dataclass
class VocabConfig:
    """Vocabulary extension before stage 1 (`elo vocab`): new target-language tokens appended to the model's
    byte-level BPE, with embedding rows initialised as the mean of their old pieces (docs/vocab.md)."""

    add: int = 0
    """New tokens to learn and add (e.g. 8000); 0 keeps the model's vocabulary. Stage 1, the write-back, the
    alignment and stage 3 then use the extended model; the base model is evaluated as it is."""
    data: list[str] = field(default_factory=list)
    """Corpora the new tokens are learned from (same formats as data.target); empty: data.target."""
    ascii_context: bool = False
    """Let a new token hold ASCII bytes (a leading space, punctuation) next to non-ASCII ones: fewer tokens, but
    words mixing ASCII and non-ASCII characters may be split differently (`elo vocab --ascii-context`)."""


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
class ChatConfig:
    """Stage 3's chat vector (chat.instruct - chat.base added to the aligned model, when both are given), and what
    every conversation of the run is rendered with."""

    base: str | None = None
    """The official base model the Instruct model was tuned from (folder or hub id)."""
    instruct: str | None = None
    """The official Instruct model (folder or hub id)."""
    scale: float = 1.0
    """Multiplies the chat vector."""
    skip: list[str] = field(default_factory=list)
    """Tensors kept as the aligned model's: embeddings and/or head (for an extended vocabulary; docs/stage3.md)."""
    template: str | None = None
    """Jinja chat template file used for stage 3 and the chat evaluation when the model's tokenizer has none (e.g.
    the Instruct model's chat_template.jinja); the stage-3 model keeps it."""
    seq_len: int | None = None
    """Longest conversation in tokens that SFT trains on and the chat evaluation scores (longer ones are skipped and
    counted); None: seq_len."""


@dataclass
class SftConfig(TrainConfig):
    """Stage 3's supervised fine-tuning on conversations, after the chat vector (or the alignment)."""

    data: list[str] = field(default_factory=list)
    """Conversation sources, SOURCE[#FIELD][@WEIGHT] as for `elo sft` (target language and English 1:1 in the paper);
    `demo` is the embedded demo's German and English training conversations. Empty: no SFT."""
    tokens: int | None = None
    """Tokens of the conversations trained (padding not counted); None: every conversation once (weights ignored)."""
    lr: float = 2e-5
    """Peak learning rate (a usual rate for full SFT of chat models; `elo sft` keeps the training commands' 5e-5)."""
    method: str = "fft"
    """fft (every parameter) or lora (adapters merged into the weights at the end)."""


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
    """The report flags English bits/char (of held-out text, and of chat answers) of the final and stage-3 models worse
    than the base's by more than this many percent."""
    chat: dict[str, str] | None = None
    """Held-out conversations per language for answer bits/char through the chat template (docs/stage3.md), e.g.
    {de: chats_de.jsonl, en: chats_en.jsonl}. Unset: the demo's held-out German and English ones on the embedded
    corpora (with a model that has a chat template), none otherwise; {} for none."""
    chat_prompts: dict[str, list[str]] = field(default_factory=dict)
    """Prompts per language answered greedily through the chat template; de and en have built-in prompts."""
    chat_tokens: int = 48
    """New tokens per chat answer (it stops earlier at the end-of-turn token); 0 turns chat answers off."""
    chat_template_tasks: bool = False
    """Run eval.tasks through the chat template (lm-eval's apply_chat_template, few-shot examples as turns)."""


@dataclass
class RunConfig:
    """The whole ELO pipeline: stage 1, write-back, alignment and evaluation."""

    model: str | None = None
    """Hugging Face model folder (safetensors); None uses the embedded default SmolLM2-135M-Instruct."""
    layers: str = "0,-1"
    """Decoder layers trained in stage 1: indices and start:stop ranges, negatives from the end (e.g. 0,-1 or 0,15,-1),
    or `probe` (`probe:K`): the 2 (K) layers `elo probe` suggests on the run's corpora, measured once and cached in the
    run folder (docs/probe.md)."""
    target_language: str = "de"
    """Code of the target language, used to label results; with no data.target given it also picks the embedded
    corpora (de: German, ko: Korean)."""
    seq_len: int = 256
    """Tokens per training sequence and evaluation window."""
    seed: int = 0
    """Seed for data order and initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """Vocabulary extension before stage 1 (off unless vocab.add > 0)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """ELO stage-1 settings."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Alignment settings."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    """Stage 3's chat vector (off unless chat.base and chat.instruct are given)."""
    sft: SftConfig = field(default_factory=SftConfig)
    """Stage 3's supervised fine-tuning (off unless sft.data is given)."""
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


def describe(config: object | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value, docstring) for every setting of `config` (default: the defaults), for help output."""
    return configparse.describe(RunConfig() if config is None else config, prefix)


def from_dict(*layers: dict) -> RunConfig:
    """A validated RunConfig from nested (or dotted) value dicts applied in order over the defaults."""
    config = RunConfig()
    for values in layers:
        apply_values(config, nest(values or {}))
    validate(config)
    return config


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
        apply_values(config, values)
    apply_values(config, parse_overrides(overrides or []))
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
        (train.optimizer_rank >= 1, f"{prefix}optimizer_rank must be >= 1 (the rank of galore's and apollo's projections)"),
        (train.precision in PRECISIONS, f"{prefix}precision must be one of {', '.join(PRECISIONS)}, not {train.precision!r}"),
        (train.precision != "bf16-true" or train.optimizer == "adamw_kahan", f"{prefix}precision bf16-true {BF16_TRUE_NEEDS}"),
        (not train.step_in_backward or train.optimizer in STEP_IN_BACKWARD_OPTIMIZERS,
         f"{prefix}step_in_backward works with optimizer {', '.join(STEP_IN_BACKWARD_OPTIMIZERS)}, not {train.optimizer}"),
        (not train.step_in_backward or train.grad_accum == 1,
         f"{prefix}step_in_backward steps at every backward pass, so it cannot accumulate gradients: set {prefix}grad_accum 1 "
         f"(raise {prefix}batch_size instead) or turn step_in_backward off"),
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
        (config.vocab.add >= 0, f"vocab.add must be a number of new tokens >= 0 (0 keeps the vocabulary), not {config.vocab.add}"),
        (config.stage1.bridge_tokens == AUTO or (isinstance(config.stage1.bridge_tokens, int) and config.stage1.bridge_tokens >= 0),
         f"stage1.bridge_tokens must be a token count >= 0 (0 turns bridges off) or {AUTO}, not {config.stage1.bridge_tokens!r}"),
        (config.stage1.probe_tokens >= config.seq_len, f"stage1.probe_tokens must hold at least one sequence of seq_len "
         f"({config.seq_len}) tokens, not {config.stage1.probe_tokens}"),
        (config.stage1.new_rows_lr is None or config.stage1.new_rows_lr > 0, "stage1.new_rows_lr must be positive (or unset: stage1.lr)"),
        (config.stage1.new_rows_lr is None or config.stage1.train_new_rows, "stage1.new_rows_lr is the learning rate of the rows "
         "stage1.train_new_rows trains; set stage1.train_new_rows=true, or leave stage1.new_rows_lr unset"),
        (config.stage1.emulator_layers >= 0, "stage1.emulator_layers must be >= 0 (0 turns the emulator off)"),
        (config.stage1.emulator_tokens >= config.seq_len, f"stage1.emulator_tokens must hold at least one sequence of "
         f"seq_len ({config.seq_len}) tokens"),
        (not config.stage1.emulator_layers or config.stage1.bridge_tokens in (AUTO, 0), "stage1.emulator_layers and "
         "stage1.bridge_tokens both stand in for the removed layers; set stage1.bridge_tokens=0 (or auto) with an emulator"),
        (not config.stage1.emulator_layers or not config.stage1.frozen_layers, "stage1.emulator_layers and "
         "stage1.frozen_layers both add frozen layers to the shallow model; use one of them"),
    ]
    probe_size(config.layers)  # a bad probe:K is refused here; layer indices are checked against the model later
    chat = config.chat
    checks += [
        (bool(chat.base) == bool(chat.instruct), f"chat.{'base' if chat.base else 'instruct'} is set without "
         f"chat.{'instruct' if chat.base else 'base'}; the chat vector is instruct - base, so give both or neither"),
        (math.isfinite(chat.scale), f"chat.scale must be a finite number, not {chat.scale}"),
        (chat.seq_len is None or chat.seq_len >= 8, "chat.seq_len must be at least 8 tokens (or unset: seq_len)"),
        (set(chat.skip) <= {"embeddings", "head"}, f"chat.skip takes embeddings and/or head, not {chat.skip}"),
        (config.sft.method in ("fft", "lora"), f"sft.method must be fft or lora, not {config.sft.method!r}"),
        (config.eval.chat_tokens >= 0, "eval.chat_tokens must be >= 0 (0 turns chat answers off)"),
        (not config.eval.chat_template_tasks or config.eval.tasks, "eval.chat_template_tasks=true runs eval.tasks "
         "through the chat template, but eval.tasks is empty; name tasks, or leave it false"),
    ]
    checks += train_checks(config.stage1, "stage1.") + train_checks(config.align, "align.", min_tokens=0)  # 0: no alignment
    checks += train_checks(config.sft, "sft.")
    for ok, message in checks:
        if not ok:
            raise EloError(message)


def probe_size(layers: str) -> int | None:
    """K of a `layers: probe` (2) or `probe:K` setting; None for an ordinary layer spec."""
    text = str(layers).replace(" ", "")
    if not text.startswith("probe"):
        return None
    k = text.removeprefix("probe").removeprefix(":") or "2"
    if not k.isdigit() or int(k) < 1 or text not in ("probe", f"probe:{k}"):
        raise EloError(f"layers {layers!r}: write probe (2 layers) or probe:K with K >= 1, e.g. probe:3")
    return int(k)


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


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
