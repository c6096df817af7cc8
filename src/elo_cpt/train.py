"""Training stages on transformers' Trainer: ELO stage 1 (shallow model) and alignment (full fine-tuning).

Trainer brings the schedule, gradient accumulation, checkpointing, resume, progress bar and distributed launch;
this module decides what trains and where outputs land. A stage builds its output in `OUT.partial/` and
renames it to `OUT` when complete; rerunning an interrupted command resumes from the last checkpoint there.
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from elo_cpt import checkpoint, data, surgery
from elo_cpt.config import TrainConfig

STATS_FILE = "training_stats.json"


@dataclass
class StageStats:
    """What a training stage did and cost."""

    steps: int
    tokens: int
    seconds: float
    trainable_params: int
    final_loss: float | None
    peak_rss_bytes: int
    losses: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_only_layers(model: PreTrainedModel) -> int:
    """Freeze everything but the decoder layers (embedding, head and final norm stay as they are)."""
    model.requires_grad_(False)
    _, layers = surgery.find_decoder_layers(model)
    layers.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_trainer(model: PreTrainedModel, dataset: data.PackedDataset, cfg: TrainConfig, work_dir: Path, seed: int) -> StageStats:
    """Train `model` in place on `dataset` for one pass; checkpoints go to `work_dir/checkpoints`."""
    steps = math.ceil(len(dataset) / (cfg.batch_size * cfg.grad_accum))
    args = TrainingArguments(
        output_dir=str(work_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=int(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay,
        num_train_epochs=1,
        logging_steps=max(1, steps // 20),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=model.dtype == torch.bfloat16,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if resume:
        print(f"resuming from {resume}", file=sys.stderr)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    world = max(1, args.world_size)
    return StageStats(
        steps=trainer.state.global_step,
        tokens=min(trainer.state.global_step * cfg.batch_size * cfg.grad_accum * world, len(dataset)) * dataset.rows.shape[1],
        seconds=round(seconds, 2),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        final_loss=losses[-1][1] if losses else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        losses=losses,
    )


def pretrain(
    shallow_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
) -> StageStats:
    """ELO stage 1: train the decoder layers of a shallow model (from `elo detach`) and save it to `out`."""
    cfg = cfg or TrainConfig()
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    provenance = checkpoint.read_provenance(shallow_dir)
    tokenizer = checkpoint.load_tokenizer(shallow_dir)
    dataset = data.load_training_data(sources, tokenizer, seq_len, cfg.tokens)
    with checkpoint.atomic_output(out, keep_partial=True) as staging:
        torch.manual_seed(seed)
        model = checkpoint.load_model(shallow_dir)
        train_only_layers(model)
        stats = run_trainer(model, dataset, cfg, staging, seed)
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)
        surgery.save_shallow(model, {**provenance, "stage1_config": asdict(cfg)}, shallow_dir, staging)
        checkpoint.write_json(staging / STATS_FILE, stats.to_dict())
    return stats


def align(
    model_dir: str | Path,
    sources: list[str],
    out: str | Path,
    cfg: TrainConfig | None = None,
    seq_len: int = 256,
    seed: int = 0,
) -> StageStats:
    """Alignment: fine-tune every parameter of a (merged) model and save it to `out`."""
    cfg = cfg or TrainConfig()
    model_dir = checkpoint.require_model_dir(model_dir)
    tokenizer = checkpoint.load_tokenizer(model_dir)
    dataset = data.load_training_data(sources, tokenizer, seq_len, cfg.tokens)
    with checkpoint.atomic_output(out, keep_partial=True) as staging:
        torch.manual_seed(seed)
        model = checkpoint.load_model(model_dir)
        model.requires_grad_(True)
        stats = run_trainer(model, dataset, cfg, staging, seed)
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        checkpoint.copy_side_files(model_dir, staging, skip=("config.json", "generation_config.json"))
        checkpoint.write_json(staging / STATS_FILE, stats.to_dict())
    return stats
