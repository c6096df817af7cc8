"""Training stages on transformers' Trainer: ELO stage 1, alignment, and the baselines users compare against.

Trainer brings the schedule, gradient accumulation, mixed precision, checkpointing, resume, progress bar and
distributed launch (torchrun / accelerate launch -> DDP); this module decides what trains, how the loss is
computed, what a checkpoint holds and where outputs land. A stage builds its output in `OUT.partial/` and
renames it to `OUT` when complete; rerunning an interrupted command resumes from the last checkpoint there.

Methods (one engine, same data and token budget):
    elo     stage 1: the shallow model's decoder layers train (`pretrain`)
    fft     every parameter trains (`align` is fft on the merged model)
    freeze  the selected layers train, but the whole model is computed
    lora    low-rank adapters on every linear layer (peft), merged into the weights at the end
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from elo_cpt import checkpoint, data, distributed, surgery
from elo_cpt import precision as precision_mod
from elo_cpt.config import AUTO, TrainConfig, bridge_token_count, check_seq_len, validate_train
from elo_cpt.errors import EloError
from elo_cpt.stageclock import CLOCK_FILE, StageClock, last_complete_checkpoint, save_loss_plot, stage_output

STATS_FILE = "training_stats.json"
METHODS = ("fft", "freeze", "lora")


@dataclass
class StageStats:
    """What a training stage did and cost."""

    steps: int
    tokens: int
    seconds: float  # wall-clock training seconds of every invocation that trained the stage, lost work included
    resumes: int  # invocations after the first (reruns after an interruption)
    trainable_params: int
    final_loss: float | None
    peak_rss_bytes: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    precision: str = "32-true"
    hardware: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def train_only_layers(model: PreTrainedModel, layers: list[int] | None = None) -> int:
    """Freeze everything but the given decoder layers (all of them if None); return the trainable count."""
    model.requires_grad_(False)
    _, stack = surgery.find_decoder_layers(model)
    for index in range(len(stack)) if layers is None else layers:
        stack[index].requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Passthrough(nn.Module):
    """Stands in for the LM head so the model returns hidden states; the loss applies the head in chunks."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, one chunk of rows at a time.

    The forward pass also computes the gradients (softmax minus one-hot, times the weight or the hidden states),
    so neither the full logits nor a recomputation is needed: memory holds one chunk x vocab block, and the
    FLOPs equal those of the unchunked loss.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk):
            rows, target = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (rows @ weight.T).float()
            valid = target != -100
            picked = target.clamp(min=0)
            log_norm = torch.logsumexp(logits, dim=-1)
            total += ((log_norm - logits.gather(1, picked[:, None]).squeeze(1)) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            d_logits = torch.exp(logits - log_norm[:, None])
            d_logits[torch.arange(len(target), device=d_logits.device), picked] -= 1
            d_logits *= valid[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += d_logits.T @ rows.float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else torch.empty(0),
        )
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output if ctx.needs_input_grad[0] else None,
            grad_weight * grad_output if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def chunked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int,
                    num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of a linear head over `hidden`, `chunk` positions of logits at a time, summed and
    divided by `num_items` (the targets of the whole accumulated batch, as Trainer counts them), or by this batch's
    own targets when it is None (a mean)."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = _LinearCrossEntropy.apply(hidden, head.weight, targets, chunk)
    return total / (num_items if num_items is not None else (targets != -100).sum().clamp(min=1))


def supports_chunked_loss(model: PreTrainedModel, distributed: bool) -> bool:
    """Chunking needs a plain linear head without bias, and no logit soft-capping or scaling after it. Under DDP the
    head must be frozen, since it runs outside the wrapped forward and its gradient would not be synchronised."""
    text = model.config.get_text_config()
    plain = getattr(text, "final_logit_softcapping", None) is None and getattr(text, "logit_scale", None) is None
    head = model.get_output_embeddings()
    linear = isinstance(head, nn.Linear) and head.bias is None
    return plain and linear and not (distributed and head.weight.requires_grad)


class EloTrainer(Trainer):
    """Trainer with a vocabulary loss in chunks, and checkpoints that hold only the trainable tensors."""

    def __init__(self, *args, loss_chunk: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # parameters are not whole tensors there
        self.lean_checkpoints = not sharded
        self.loss_chunk = loss_chunk if not sharded and supports_chunked_loss(self.model, self.args.world_size > 1) else 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_chunk:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inner = self.accelerator.unwrap_model(model)
        head = inner.get_output_embeddings()
        inner.set_output_embeddings(_Passthrough())
        try:
            hidden = model(input_ids=inputs["input_ids"]).logits
        finally:
            inner.set_output_embeddings(head)
        # Accelerate autocasts only the model's forward; the head runs here, so it gets the same precision.
        with self.accelerator.autocast():
            loss = chunked_lm_loss(head, hidden, inputs["labels"], self.loss_chunk, num_items_in_batch)
        # Trainer counts `num_items_in_batch` over the accumulated batch of every process (for models that take loss
        # kwargs) and then leaves the loss undivided by the accumulation steps; DDP averages the gradients across
        # processes, which the global count has already done, hence the same rescaling as Trainer's own loss.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        # A checkpoint needs only what changes; frozen tensors come back from the model folder on resume
        # (Trainer loads checkpoint weights non-strictly).
        if not self.lean_checkpoints:
            return super()._save(output_dir, state_dict)
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().contiguous().cpu() for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad}
        safetensors.torch.save_file(trainable, output_dir / "model.safetensors", metadata={"format": "pt"})
        torch.save(self.args, output_dir / "training_args.bin")


class TokensPerSecond(TrainerCallback):
    """Shows training tokens per second in the progress bar's log lines."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start = None
        self.start_step = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start, self.start_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.start is not None and state.global_step > self.start_step:
            elapsed = time.perf_counter() - self.start
            logs["tokens_per_s"] = round((state.global_step - self.start_step) * self.tokens_per_step / elapsed, 1)


def training_arguments(cfg: TrainConfig, work_dir: Path, steps: int, seed: int, precision: str) -> TrainingArguments:
    """Trainer settings for one pass of `steps` optimizer steps at a resolved `precision`."""
    optim, _ = precision_mod.optimizer(cfg)
    return TrainingArguments(
        output_dir=str(work_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        num_train_epochs=1,
        logging_steps=max(1, steps // 20),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        # Rows are shuffled once by our seed and then read in order, so the data order is the same for one
        # process or many (each takes its share of every global batch) and a resume can position directly.
        train_sampling_strategy="sequential",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16-mixed",  # autocast over fp32 weights; bf16-true weights are bf16 already
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def run_trainer(model: PreTrainedModel, dataset: data.PackedDataset, cfg: TrainConfig, work_dir: Path, seed: int
                ) -> tuple[StageStats, Trainer]:
    """Train `model` in place on `dataset` for one pass; checkpoints go to `work_dir/checkpoints`."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    dataset = dataset.shuffled(order)  # a permutation of indices: the (memory-mapped) rows are not copied
    world = distributed.world_size()
    steps = math.ceil(len(dataset) / (cfg.batch_size * cfg.grad_accum * world))
    precision = precision_mod.resolve(cfg.precision)
    args = training_arguments(cfg, work_dir, steps, seed, precision)
    seq_len = dataset.seq_len
    tokens_per_step = cfg.batch_size * cfg.grad_accum * max(1, args.world_size) * seq_len
    clock = StageClock(work_dir / CLOCK_FILE, write=args.process_index == 0)
    callbacks = [TokensPerSecond(tokens_per_step), clock]
    if args.process_index == 0:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(work_dir / "logs"))))
    trainer = EloTrainer(model=model, args=args, train_dataset=dataset, loss_chunk=cfg.loss_chunk, callbacks=callbacks,
                         optimizer_cls_and_kwargs=precision_mod.optimizer(cfg)[1])
    resume = last_complete_checkpoint(Path(args.output_dir))
    if resume or clock.invocations > 1:
        print(f"resuming from {resume or 'the start (no complete checkpoint)'}: run {clock.invocations} of this stage, "
              f"{clock.earlier_seconds:.1f} s trained before", file=sys.stderr)
    clock.begin()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:  # an exception or Ctrl-C: its seconds still count when the stage is rerun
        clock.save()
    seconds = clock.seconds
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    if args.process_index == 0:
        save_loss_plot(losses, work_dir / "loss.png")
    stats = StageStats(
        steps=trainer.state.global_step,
        tokens=min(trainer.state.global_step * tokens_per_step, len(dataset) * seq_len),
        seconds=round(seconds, 2),
        resumes=clock.invocations - 1,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        final_loss=losses[-1][1] if losses else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        losses=losses,
        precision=precision,
        hardware=precision_mod.hardware(),
    )
    return stats, trainer


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
) -> StageStats:
    """The sequence every training stage shares: data, model, what trains (`prepare`), Trainer, then the result in
    `out` (`save` writes the model files from the in-memory model; the side files, stats and a shallow model's
    provenance, as it stands after `prepare`, are added here).

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
        dataset = data.load_training_data(sources, tokenizer, seq_len, cfg.tokens)
    world = distributed.world_size()
    if len(dataset) < cfg.batch_size * cfg.grad_accum * world:
        raise EloError(f"{len(dataset)} sequences of {seq_len} tokens cannot fill one optimizer step of {cfg.batch_size} "
                       f"sequences x {cfg.grad_accum} accumulation steps x {world} processes; raise the token budget or "
                       "lower the batch size, accumulation or process count")
    with stage_output(out) as (staging, main):
        torch.manual_seed(seed)
        model = prepare(checkpoint.load_model(model_dir, weights_dtype))
        stats, trainer = run_trainer(model, dataset, cfg, staging, seed)
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
        engine = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else None
        checkpoint.write_json(staging / STATS_FILE, {**stats.to_dict(), **(extra_stats or {}),
                                                     "processes": trainer.args.world_size, "sharding": engine})
        if provenance is not None:
            checkpoint.write_json(staging / checkpoint.PROVENANCE, provenance)
    return stats


def pretrain(
    shallow_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
    train_norm: bool = False,
) -> StageStats:
    """ELO stage 1: train the decoder layers of a shallow model (from `elo detach`) and save it to `out`.

    Layers detached as frozen stay frozen, bridges fitted by `surgery.add_bridges` are applied (frozen);
    `train_norm` also trains the final norm (written back by `merge`).
    """
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    provenance = {**checkpoint.read_provenance(shallow_dir), "stage1_config": asdict(cfg or TrainConfig())}

    def prepare(model: PreTrainedModel) -> PreTrainedModel:
        kept = provenance["layers"]
        train_only_layers(model, [kept.index(layer) for layer in provenance.get("trained_layers", kept)])
        surgery.apply_bridges(model, shallow_dir)
        if train_norm:
            params = dict(model.named_parameters())
            names = surgery.final_norm_names(model)
            # The originals' digests let `merge` refuse a base the norm did not come from, as for the layers.
            provenance["trained_tensors"] = names
            provenance["replaced_digests"] = {**provenance["replaced_digests"],
                                              **{n: checkpoint.tensor_digest(params[n].detach()) for n in names}}
            for name in names:
                params[name].requires_grad_(True)
        return model

    def save(model: PreTrainedModel, staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)

    return _run_stage(shallow_dir, sources, out, cfg or TrainConfig(), seq_len, seed, prepare, save, provenance=provenance)


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
) -> StageStats:
    """Fine-tune a whole model with `method` (fft, freeze or lora) and save a standard model folder to `out`."""
    if method not in METHODS:
        raise EloError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    model_dir = checkpoint.require_model_dir(model_dir)

    def prepare(model: PreTrainedModel) -> PreTrainedModel:
        if method == "freeze":
            train_only_layers(model, surgery.resolve_layers(layers, surgery.num_layers(model.config)))
        elif method == "lora":
            model = _with_lora(model, (cfg or TrainConfig()).lora_rank)
        return model

    def save(model: PreTrainedModel, staging: Path) -> None:
        (model.merge_and_unload() if method == "lora" else model).save_pretrained(staging, safe_serialization=True)

    return _run_stage(model_dir, sources, out, cfg or TrainConfig(), seq_len, seed, prepare, save, {"method": method})


def _with_lora(model: PreTrainedModel, rank: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def align(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
) -> StageStats:
    """Alignment: fine-tune every parameter of a (merged) model and save it to `out`."""
    return finetune(model_dir, sources, out, cfg, seq_len, seed, method="fft")
