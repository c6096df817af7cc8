"""The training engine every stage shares: transformers' Trainer with a vocabulary loss in chunks, lean checkpoints,
precision, progress and cost accounting. `train` decides what trains and where outputs go; this module trains it.

Trainer brings the schedule, gradient accumulation, mixed precision, checkpointing, resume, progress bar and
distributed launch (torchrun / accelerate launch -> DDP).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from elo_cpt import data, distributed
from elo_cpt.backward_step import StepInBackward
from elo_cpt import precision as precision_mod
from elo_cpt.config import TrainConfig
from elo_cpt.errors import EloError
from elo_cpt.stageclock import CLOCK_FILE, StageClock


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
    processes: int = 1
    eval_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # held-out loss per language

    def to_dict(self) -> dict:
        return asdict(self)


class Passthrough(nn.Module):
    """Stands in for the LM head so the model returns hidden states; the loss applies the head in chunks."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T`, one chunk of rows at a time.

    The forward pass also computes the gradients (softmax minus one-hot, times the weight or the hidden states),
    so neither the full logits nor a recomputation is needed: memory holds one chunk x vocab block, and the
    FLOPs equal those of the unchunked loss. Liger Kernel and Cut Cross-Entropy fuse the same on GPUs only (Triton);
    this one runs, and is tested, everywhere (docs/design.md).
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


def model_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int,
                  num_items: torch.Tensor | int | None = None, inner: nn.Module | None = None,
                  head_autocast: contextlib.AbstractContextManager | None = None,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch as elo-cpt trains it, shared by `EloTrainer` and `elo bench`: the model runs with its
    head replaced by a pass-through, so it returns hidden states, and the head runs in `chunked_lm_loss`.

    `inner` is the model whose head is swapped when `model` is a wrapper (DDP, Accelerate); `head_autocast` runs the
    head in the precision the wrapper's forward ran in (Accelerate autocasts only the model's forward).
    """
    inner = model if inner is None else inner
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(Passthrough())
    try:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        inner.set_output_embeddings(head)
    with head_autocast or contextlib.nullcontext():
        return chunked_lm_loss(head, hidden, labels, chunk, num_items)


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

    def get_decay_parameter_names(self, model) -> list[str]:
        # a tensor whose rows partly stay frozen (`train.train_rows_from`) takes no decay: it would move those rows
        return [n for n in super().get_decay_parameter_names(model) if not getattr(model.get_parameter(n), "_elo_no_decay", False)]

    def create_optimizer(self, model=None):
        # parameters marked `_elo_lr` (`train.train_rows_from`) get groups of their own at that rate, made before the
        # optimizer is built, so any optimizer (and step_in_backward's per-parameter ones) takes them as plain groups
        opt_model = self.model if model is None else model
        if self.optimizer is None and any(hasattr(p, "_elo_lr") for p in opt_model.parameters() if p.requires_grad):
            cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer_cls_and_kwargs = (with_own_rates(cls), kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_chunk:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # padded batches (chat data) bring an attention mask; packed rows are full and have none
        loss = model_lm_loss(model, inputs["input_ids"], inputs["labels"], self.loss_chunk, num_items_in_batch,
                             inner=self.accelerator.unwrap_model(model), head_autocast=self.accelerator.autocast(),
                             attention_mask=inputs.get("attention_mask"))
        # Trainer counts `num_items_in_batch` over the accumulated batch of every process (for models that take loss
        # kwargs) and then leaves the loss undivided by the accumulation steps; DDP averages the gradients across
        # processes, which the global count has already done, hence the same rescaling as Trainer's own loss.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss  # no logits: they were never built whole (evaluation asks for the loss alone)

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


def with_own_rates(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`optimizer_cls` (a subclass of the same name and module, which Trainer's bitsandbytes check reads) that takes
    each parameter marked `_elo_lr` out of its group into a group of its own, with that group's other settings
    (weight decay) and that peak rate; the scheduler then scales every group's rate alike."""

    def __init__(self, params, *args, **kwargs):
        params = list(params)
        split = []
        for group in params if params and isinstance(params[0], dict) else [{"params": params}]:
            group = {**group, "params": list(group["params"])}
            own = [p for p in group["params"] if hasattr(p, "_elo_lr")]
            split.append({**group, "params": [p for p in group["params"] if not hasattr(p, "_elo_lr")]})
            split += [{**group, "params": [p], "lr": p._elo_lr} for p in own]
        optimizer_cls.__init__(self, split, *args, **kwargs)

    return type(optimizer_cls.__name__, (optimizer_cls,), {"__init__": __init__, "__module__": optimizer_cls.__module__,
                                                          "__qualname__": optimizer_cls.__qualname__})


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


def trackers(cfg: TrainConfig) -> list[str]:
    """The trackers of `report_to` that Trainer reports to itself, checked to be installed."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [t for t in cfg.report_to if t not in ("tensorboard", "none")]
    missing = [t for t in wanted if t not in get_available_reporting_integrations()]
    if missing:
        raise EloError(f"report_to {missing[0]} needs its package (pip install {missing[0].replace('_', '-')}); "
                       "or drop it from report_to")
    return wanted


def training_arguments(cfg: TrainConfig, work_dir: Path, steps: int, seed: int, precision: str, optim: str,
                       evaluate: bool = False) -> TrainingArguments:
    """Trainer settings for one pass of `steps` optimizer steps at a resolved `precision`; with `evaluate`, the loss
    on held-out data every `cfg.eval_steps` steps (the loss alone: no logits are gathered)."""
    return TrainingArguments(
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        per_device_eval_batch_size=cfg.batch_size,
        prediction_loss_only=True,
        output_dir=str(work_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=0.0 if cfg.step_in_backward else cfg.max_grad_norm,  # no global norm: each weight steps alone
        optim=optim,
        **precision_mod.optimizer_arguments(cfg),  # galore's and apollo's target modules and rank
        activation_checkpointing=cfg.gradient_checkpointing,
        num_train_epochs=1,
        logging_steps=cfg.logging_steps or max(1, steps // 20),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        # Rows are shuffled once by our seed and then read in order, so the data order is the same for one
        # process or many (each takes its share of every global batch) and a resume can position directly.
        train_sampling_strategy="sequential",
        report_to=trackers(cfg) or "none",  # TensorBoard is added by run_trainer, writing into the stage's logs/
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16-mixed",  # autocast over fp32 weights; bf16-true weights are bf16 already
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `run_trainer` steps `model` with under `cfg`, built by Trainer's own code (its parameter groups,
    galore's and apollo's target modules, bitsandbytes' fp32 embeddings), for loops that step it themselves
    (`elo bench`, the optimizer tests)."""
    import tempfile

    optim, custom = precision_mod.optimizer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=optim, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                                 report_to="none", use_cpu=not torch.cuda.is_available(), **precision_mod.optimizer_arguments(cfg))
        custom = _in_backward(cfg, args, model, custom)
        return Trainer(model=model, args=args, optimizer_cls_and_kwargs=custom).create_optimizer()


def _in_backward(cfg: TrainConfig, args: TrainingArguments, model: nn.Module, custom: tuple[type, dict] | None) -> tuple[type, dict] | None:
    """The optimizer class and arguments Trainer builds: with `step_in_backward`, the configured optimizer wrapped
    so that each parameter steps inside the backward pass (`backward_step`)."""
    if not cfg.step_in_backward:
        return custom
    if distributed.world_size() > 1:
        raise EloError("step_in_backward steps each weight before the processes' gradients are reduced, so it runs on one "
                       "process only: launch without torchrun/accelerate, or turn step_in_backward off")
    return StepInBackward, {"inner": custom or Trainer.get_optimizer_cls_and_kwargs(args, model)}


def save_loss_plot(losses: list[tuple[int, float]], path: Path) -> None:
    """The stage's training loss against optimizer steps, as a PNG beside the model."""
    # A bare Figure on its own Agg canvas, not pyplot: the calling process keeps its backend and its figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot([s for s, _ in losses], [loss for _, loss in losses], marker="." if len(losses) < 30 else None)
    axes.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title=f"{path.parent.name.removesuffix('.partial')}: loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose files were all written, deleting any a crash left half-written.

    Trainer writes `trainer_state.json` last, so a checkpoint is complete when that file parses and names the
    checkpoint's step.
    """
    if not folder.is_dir():
        return None
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for candidate in reversed(checkpoints):
        try:
            state = json.loads((candidate / "trainer_state.json").read_text())
            if state.get("global_step") == int(candidate.name.split("-")[-1]):
                return str(candidate)
        except (OSError, ValueError):
            pass
        shutil.rmtree(candidate, ignore_errors=True)
    return None


def run_trainer(model: PreTrainedModel, dataset: data.PackedDataset, cfg: TrainConfig, work_dir: Path, seed: int,
                eval_datasets: dict[str, data.PackedDataset] | None = None) -> tuple[StageStats, Trainer]:
    """Train `model` in place on `dataset` for one pass; checkpoints go to `work_dir/checkpoints`. With
    `eval_datasets` ({language: packed held-out rows}) and `cfg.eval_steps`, the held-out loss of each is logged
    every `cfg.eval_steps` steps and at the end (`StageStats.eval_losses`).

    `dataset` is packed rows, or any dataset with the same `shuffled` and `tokens_of` (the tokens of its first n
    examples, padding excluded) and, for examples of different lengths, a `collate` that pads a batch.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    dataset = dataset.shuffled(order)  # a permutation of indices: the (memory-mapped) rows are not copied
    world = distributed.world_size()
    steps = math.ceil(len(dataset) / (cfg.batch_size * cfg.grad_accum * world))
    precision = precision_mod.resolve(cfg.precision)
    optim, custom_optimizer = precision_mod.optimizer(cfg)
    evaluate = bool(eval_datasets) and cfg.eval_steps > 0
    args = training_arguments(cfg, work_dir, steps, seed, precision, optim, evaluate)
    custom_optimizer = _in_backward(cfg, args, model, custom_optimizer)
    examples_per_step = cfg.batch_size * cfg.grad_accum * max(1, args.world_size)
    # packed rows: exactly seq_len per example; padded examples: their mean length, for the progress bar's rate
    tokens_per_step = round(examples_per_step * dataset.tokens_of(len(dataset)) / len(dataset))
    clock = StageClock(work_dir / CLOCK_FILE, write=args.process_index == 0)
    callbacks = [TokensPerSecond(tokens_per_step), clock]
    if args.process_index == 0 and "tensorboard" in cfg.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(work_dir / "logs"))))
    use_cache = model.config.use_cache  # Trainer turns the KV cache off for training; the saved model keeps the input's
    trainer = EloTrainer(model=model, args=args, train_dataset=dataset, loss_chunk=cfg.loss_chunk, callbacks=callbacks,
                         optimizer_cls_and_kwargs=custom_optimizer, data_collator=getattr(dataset, "collate", None),
                         eval_dataset=eval_datasets if evaluate else None)
    resume = last_complete_checkpoint(Path(args.output_dir))
    if resume or clock.invocations > 1:
        print(f"resuming from {resume or 'the start (no complete checkpoint)'}: run {clock.invocations} of this stage, "
              f"{clock.earlier_seconds:.1f} s trained before", file=sys.stderr)
    clock.begin()
    try:
        trainer.train(resume_from_checkpoint=resume)
        last = trainer.state.global_step
        if evaluate and not any(e.get("step") == last and any(k.startswith("eval_") for k in e) for e in trainer.state.log_history):
            trainer.evaluate()  # the trained model's held-out loss, where Trainer's own schedule did not log it
    finally:  # an exception or Ctrl-C: its seconds still count when the stage is rerun
        clock.save()
    model.config.use_cache = use_cache
    seconds = clock.seconds
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    eval_losses = {lang: [(int(e["step"]), float(e[f"eval_{lang}_loss"])) for e in trainer.state.log_history
                          if f"eval_{lang}_loss" in e] for lang in (eval_datasets or {}) if evaluate}
    if args.process_index == 0:
        save_loss_plot(losses, work_dir / "loss.png")
    stats = StageStats(
        steps=trainer.state.global_step,
        tokens=dataset.tokens_of(min(trainer.state.global_step * examples_per_step, len(dataset))),
        seconds=round(seconds, 2),
        resumes=clock.invocations - 1,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        final_loss=losses[-1][1] if losses else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        losses=losses,
        precision=precision,
        hardware=precision_mod.hardware(),
        processes=args.world_size,
        eval_losses=eval_losses,
    )
    return stats, trainer
