"""Training stages: ELO stage 1, alignment, the baselines users compare against, and stage 3's supervised fine-tuning.

This module decides what trains and where outputs land; `engine` trains it (transformers' Trainer). A stage builds
its output in `OUT.partial/` and renames it to `OUT` when complete; rerunning an interrupted command resumes from
the last checkpoint there.

Methods (one engine, same data and token budget):
    elo     stage 1: the shallow model's decoder layers train (`pretrain`)
    fft     every parameter trains (`align` is fft on the merged model; `sft` on conversations, stage 3)
    freeze  the selected layers train, but the whole model is computed
    lora    low-rank adapters on every linear layer (peft), merged into the weights at the end
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoConfig, PreTrainedModel

from elo_cpt import chattokens, checkpoint, data, distributed, evaluation, files, surgery, vocabulary
from elo_cpt import precision as precision_mod
from elo_cpt.config import AUTO, FINETUNE_METHODS, TrainConfig, bridge_token_count, check_seq_len, validate_train
from elo_cpt.engine import StageStats, last_complete_checkpoint, run_trainer
from elo_cpt.errors import EloError
from elo_cpt.stageclock import CLOCK_FILE

STATS_FILE = "training_stats.json"
#: Characters of each held-out text the loss during training reads (as `eval.max_chars` by default).
HELD_OUT_CHARS = 20_000
METHODS = FINETUNE_METHODS
SFT_METHODS = ("fft", "lora")


def train_only_layers(model: PreTrainedModel, layers: list[int] | None = None) -> int:
    """Freeze everything but the given decoder layers (all of them if None); return the trainable count."""
    model.requires_grad_(False)
    _, stack = surgery.find_decoder_layers(model)
    for index in range(len(stack)) if layers is None else layers:
        stack[index].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def stage_output(out: str | Path) -> Iterator[tuple[Path, bool]]:
    """The staging folder of a training stage, and whether this process writes the result.

    Under torchrun every process trains, but only the main one saves and renames the output.
    """
    main = distributed.is_main()
    if main:
        fresh = not checkpoint.staging_path(Path(out)).exists()

        def keep(err: BaseException) -> bool:
            # An interruption, or a failure after a checkpoint, is resumed by rerunning; an error in a stage this
            # invocation started, before any checkpoint, leaves nothing behind.
            staging = checkpoint.staging_path(Path(out))
            return not fresh or not isinstance(err, Exception) or last_complete_checkpoint(staging / "checkpoints") is not None

        with checkpoint.atomic_output(out, keep_partial=keep) as staging:
            yield staging, True
    else:
        yield checkpoint.staging_path(Path(out)), False


def _run_stage(
    model_dir: Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig,
    seq_len: int,
    seed: int,
    prepare: Callable[[PreTrainedModel], PreTrainedModel],
    save: Callable[[PreTrainedModel, Path], None],
    extra_stats: dict | None = None,
    provenance: dict | None = None,
    load_data: Callable[[object], Dataset] | None = None,
    finish: Callable[[Path], None] | None = None,
    held_out: dict[str, str | Path] | None = None,
    held_out_chars: int = HELD_OUT_CHARS,
) -> StageStats:
    """The sequence every training stage shares: data, model, what trains (`prepare`), Trainer, then the result in
    `out` (`save` writes the model files from the in-memory model; the side files, stats and a shallow model's
    provenance, as it stands after `prepare`, are added here).

    The data is `sources` packed into rows of `seq_len` tokens, unless `load_data` builds it from the tokenizer
    (chat data: padded conversations). `finish` adds files to the output after the side files are copied.
    `held_out` ({language: text file}, the first `held_out_chars` characters of each) gives the held-out loss every
    `cfg.eval_steps` steps.

    Under FSDP or DeepSpeed the parameters are sharded across processes, so the model is gathered and saved with
    Trainer's own `save_model` on every process instead of `save`.
    """
    validate_train(cfg, seq_len)
    checkpoint.check_output(out, overwrite=False)  # a rerun resumes from OUT.partial; a finished OUT is not overwritten
    # fp32 master weights except in bf16-true; the result is saved in the dtype the input was stored in
    weights_dtype = torch.bfloat16 if precision_mod.resolve(cfg.precision) == "bf16-true" else torch.float32
    stored_dtype = checkpoint.stored_dtype(model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    with distributed.main_first():  # one process tokenizes into the cache, the others read it
        dataset = load_data(tokenizer) if load_data else data.load_training_data(sources, tokenizer, seq_len, cfg.tokens)
    world = distributed.world_size()
    if len(dataset) < cfg.batch_size * cfg.grad_accum * world:
        what = f"sequences of {seq_len} tokens" if load_data is None else f"examples of up to {seq_len} tokens"
        raise EloError(f"{len(dataset)} {what} cannot fill one optimizer step of {cfg.batch_size} "
                       f"sequences x {cfg.grad_accum} accumulation steps x {world} processes; raise the token budget or "
                       "lower the batch size, accumulation or process count")
    with stage_output(out) as (staging, main):
        torch.manual_seed(seed)
        model = prepare(checkpoint.load_model(model_dir, weights_dtype))
        stats, trainer = run_trainer(model, dataset, cfg, staging, seed, held_out_rows(held_out, held_out_chars, tokenizer,
                                                                                     seq_len) if cfg.eval_steps else None)
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        if sharded:
            trainer.save_model(str(staging))  # collective: every process takes part in gathering the weights
        if not main:
            return stats
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)
        (staging / CLOCK_FILE).unlink(missing_ok=True)  # its totals are in the stats
        if not sharded:
            save(model.to(stored_dtype), staging)
        checkpoint.copy_side_files(model_dir, staging, skip=("config.json", "generation_config.json"))
        if finish is not None:
            finish(staging)
        engine = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else None
        files.write_json(staging / STATS_FILE, {**stats.to_dict(), **(extra_stats or {}),
                                                     "sharding": engine})
        if provenance is not None:
            files.write_json(staging / checkpoint.PROVENANCE, provenance)
    return stats


def held_out_rows(texts: dict[str, str | Path] | None, max_chars: int, tokenizer, seq_len: int
                  ) -> dict[str, data.PackedDataset] | None:
    """Held-out text per language, packed into rows of `seq_len` tokens for the loss during training."""
    if not texts:
        return None
    return {lang: data.PackedDataset(data.pack([evaluation.read_eval_text(path, max_chars)], tokenizer, seq_len,
                                               what=f"held-out {lang} text {path}"))
            for lang, path in texts.items()}


def pretrain(
    shallow_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
    train_norm: bool = False,
    held_out: dict[str, str | Path] | None = None,
    train_new_rows: bool = False,
    new_rows_lr: float | None = None,
) -> StageStats:
    """ELO stage 1: train the decoder layers of a shallow model (from `elo detach`) and save it to `out`.

    Layers detached as frozen stay frozen, bridges fitted by `surgery.add_bridges` are applied (frozen);
    `train_norm` also trains the final norm, `train_new_rows` the embedding (and untied head) rows `elo vocab`
    added, the old rows staying exactly as they are (`train_rows_from`), at the peak rate `new_rows_lr` (None: the
    layers' `cfg.lr`); `merge` writes them back with the layers.
    """
    if new_rows_lr is not None and not new_rows_lr > 0:
        raise EloError(f"--new-rows-lr must be a positive learning rate, not {new_rows_lr}")
    if new_rows_lr is not None and not train_new_rows:
        raise EloError("--new-rows-lr is the learning rate of the rows --train-new-rows trains; add --train-new-rows")
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    provenance = {**checkpoint.read_provenance(shallow_dir), "stage1_config": asdict(cfg or TrainConfig())}
    rows = vocabulary.new_rows(provenance["base_model"]) if train_new_rows else None
    if train_new_rows and rows is None:
        raise EloError(f"--train-new-rows trains the rows `elo vocab` added, but {provenance['base_model']} (the model "
                       f"{shallow_dir} was detached from) has no {vocabulary.VOCAB_FILE}; extend it with elo vocab first")

    def prepare(model: PreTrainedModel) -> PreTrainedModel:
        kept = provenance["layers"]
        train_only_layers(model, [kept.index(layer) for layer in provenance.get("trained_layers", kept)])
        surgery.apply_bridges(model, shallow_dir)
        names = surgery.final_norm_names(model) if train_norm else []
        if rows is not None:
            trained_rows = train_rows_from(model, rows[0], new_rows_lr)
            provenance["trained_rows"] = {name: [rows[0], rows[1]] for name in trained_rows}
            provenance["new_rows_lr"] = new_rows_lr or (cfg or TrainConfig()).lr
            names += trained_rows
        if names:
            params = dict(model.named_parameters())
            # The base's own tensors' digests let `merge` refuse a base they did not come from, as for the layers.
            provenance["trained_tensors"] = names
            provenance["replaced_digests"] = {**provenance["replaced_digests"], **{
                n: checkpoint.tensor_digest(t) for n, t in checkpoint.iter_tensors(Path(provenance["base_model"]), names)}}
            for name in names:
                params[name].requires_grad_(True)
        return model

    def save(model: PreTrainedModel, staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)

    return _run_stage(shallow_dir, sources, out, cfg or TrainConfig(), seq_len, seed, prepare, save, provenance=provenance,
                      held_out=held_out)


def train_rows_from(model: PreTrainedModel, first: int, lr: float | None = None) -> list[str]:
    """Let the embedding rows from `first` on (and an untied head's) train while the rows before stay bit for bit:
    their gradient is zeroed after each backward pass, and the tensors take no weight decay (AdamW's decoupled decay
    would shrink rows without a gradient too; `EloTrainer` leaves out parameters marked `_elo_no_decay`). With `lr`,
    the tensors train at that peak rate, in an optimizer group of their own (`EloTrainer`, parameters marked
    `_elo_lr`): a zero gradient still moves no row at any rate. Returns the names of the tensors."""
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)

    def keep_old_rows(weight: torch.Tensor) -> None:
        weight.grad[:first] = 0

    for weight in weights:
        weight.requires_grad_(True)
        weight._elo_no_decay = True
        if lr is not None:
            weight._elo_lr = lr
        weight.register_post_accumulate_grad_hook(keep_old_rows)
    return [name for name, p in model.named_parameters() if any(p is w for w in weights)]


def bridge(shallow_dir: str | Path, sources: list[str], tokens: int | str = AUTO, seq_len: int = 256,
           max_tokens: int | None = None) -> int:
    """Fit the least-squares bridges for the layers a shallow model removed (`surgery.fit_bridges`) on the first
    `tokens` of `sources` (`auto`: max(4096, 4 x hidden size), at most `max_tokens`) and store them in its folder,
    where `pretrain` applies them. Needs the base model the shallow one was detached from; returns the tokens used."""
    check_seq_len(seq_len)
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    base = checkpoint.read_provenance(shallow_dir)["base_model"]
    count = bridge_token_count(tokens, AutoConfig.from_pretrained(shallow_dir).get_text_config().hidden_size)
    count = min(count, max_tokens or count)
    if count < seq_len:
        raise EloError(f"bridges need at least one sequence of calibration text ({seq_len} tokens), not {count}; "
                       "give more tokens or turn bridges off (0)")
    calibration = data.load_training_data(sources, checkpoint.load_tokenizer(shallow_dir), seq_len, count)
    rows = torch.stack([calibration[i]["input_ids"] for i in range(len(calibration))])
    surgery.add_bridges(base, shallow_dir, rows)
    return rows.numel()


def finetune(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
    method: str = "fft",
    layers: str = "0,-1",
    held_out: dict[str, str | Path] | None = None,
) -> StageStats:
    """Fine-tune a whole model with `method` (fft, freeze or lora) and save a standard model folder to `out`
    (`held_out`: held-out text per language for the loss during training, with `cfg.eval_steps`)."""
    if method not in METHODS:
        raise EloError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    model_dir = checkpoint.require_model_dir(model_dir)
    prepare, save = _method(method, cfg or TrainConfig(), layers)
    return _run_stage(model_dir, sources, out, cfg or TrainConfig(), seq_len, seed, prepare, save, {"method": method},
                      held_out=held_out)


def _method(method: str, cfg: TrainConfig, layers: str = "0,-1") -> tuple[Callable, Callable]:
    """What trains in a whole-model method (`prepare`) and how the result is saved (`save`)."""

    def prepare(model: PreTrainedModel) -> PreTrainedModel:
        if method == "freeze":
            train_only_layers(model, surgery.resolve_layers(layers, surgery.num_layers(model.config)))
        elif method == "lora":
            model = with_lora(model, cfg.lora_rank)
        return model

    def save(model: PreTrainedModel, staging: Path) -> None:
        (model.merge_and_unload() if method == "lora" else model).save_pretrained(staging, safe_serialization=True)

    return prepare, save


def sft(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
    method: str = "fft",
    chat_template: str | Path | None = None,
    held_out: dict[str, str | Path] | None = None,
) -> StageStats:
    """Stage 3's supervised fine-tuning: train on conversations rendered with the model's chat template (or the
    Jinja file `chat_template`, which the output then keeps), with the loss on the assistant's answers only.

    `method` is fft (every parameter) or lora (merged into the weights at the end). Conversations longer than
    `seq_len` tokens are skipped and counted (in `training_stats.json`); `cfg.tokens` caps the conversations' tokens
    and lets weights mix sources (see `chattokens.load_chat_data`).
    """
    if method not in SFT_METHODS:
        raise EloError(f"unknown method {method!r} for sft; use one of {', '.join(SFT_METHODS)}")
    model_dir = checkpoint.require_model_dir(model_dir)
    template = chattokens.read_template(chat_template) if chat_template is not None else None
    cfg = cfg or TrainConfig()
    extra = {"method": method, "chat_template": str(chat_template) if chat_template is not None else None}

    def load_data(tokenizer) -> chattokens.ChatDataset:
        dataset = chattokens.load_chat_data(sources, tokenizer, seq_len, cfg.tokens, model=str(model_dir), template=template)
        extra["chat_data"] = dataset.summary  # written into training_stats.json with the stage's stats
        return dataset

    def finish(staging: Path) -> None:
        if template is not None:
            chattokens.write_template(staging, template)

    prepare, save = _method(method, cfg)
    return _run_stage(model_dir, sources, out, cfg, seq_len, seed, prepare, save, extra, load_data=load_data, finish=finish,
                      held_out=held_out)


def with_lora(model: PreTrainedModel, rank: int):
    """`model` with LoRA adapters of rank `rank` (alpha 2 x rank) on every linear layer; only they train."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def align(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
    held_out: dict[str, str | Path] | None = None,
) -> StageStats:
    """Alignment: fine-tune every parameter of a (merged) model and save it to `out`."""
    return finetune(model_dir, sources, out, cfg, seq_len, seed, method="fft", held_out=held_out)
