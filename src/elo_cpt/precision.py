"""Precision and optimizer of a training stage: what `precision` and `optimizer` mean on the hardware at hand.

A leaf module. `bf16-mixed` keeps fp32 master weights and optimizer state and computes under bf16 autocast;
`bf16-true` holds the weights in bf16 and is allowed only with Kahan-summed updates (`adamw_kahan`), since an
AdamW step of about lr is below half a bf16 ulp of most weights (docs/training.md).
"""

from __future__ import annotations

import torch

from elo_cpt.config import AUTO, TrainConfig
from elo_cpt.errors import EloError


def resolve(precision: str) -> str:
    """The precision `precision` means on this machine (`auto`: bf16-mixed on a GPU with bf16, else 32-true)."""
    cuda = torch.cuda.is_available()
    bf16_gpu = cuda and torch.cuda.is_bf16_supported()
    if precision == AUTO:
        return "bf16-mixed" if bf16_gpu else "32-true"
    if precision.startswith("bf16") and cuda and not bf16_gpu:
        raise EloError(f"precision {precision}: {torch.cuda.get_device_name()} has no bf16; use precision 32-true")
    return precision


def hardware() -> dict:
    """What trained: device, GPU name and count, torch and transformers versions (recorded with every stage)."""
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__, "transformers": transformers.__version__}


#: Trainer's `optim` name of each config optimizer Trainer builds itself, and the package it needs (import, pip name).
TRAINER_OPTIM = {"adamw": ("adamw_torch", None), "adamw_8bit": ("adamw_bnb_8bit", ("bitsandbytes", "bitsandbytes")),
                 "adafactor": ("adafactor", None), "galore": ("galore_adamw", ("galore_torch", "galore-torch")),
                 "apollo": ("apollo_adamw", ("apollo_torch", "apollo-torch"))}
#: What galore and apollo project: the linear layers inside the decoder layers (Trainer takes only nn.Linear modules);
#: embeddings, head and norms keep plain AdamW state, as in both papers.
LOW_RANK_TARGETS = r".*\.(layers|h|blocks)\.\d+\..*"


def optimizer(cfg: TrainConfig) -> tuple[str, tuple[type, dict] | None]:
    """Trainer's `optim` name, or the class and arguments of an optimizer Trainer does not know."""
    if cfg.optimizer == "adamw_kahan":
        try:
            from optimi import AdamW
        except ImportError:
            raise EloError("optimizer adamw_kahan needs torch-optimi; pip install torch-optimi, or use optimizer=adamw") from None
        # torch's AdamW defaults, so that only the summation differs from optimizer adamw
        return "adamw_torch", (AdamW, {"lr": cfg.lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": cfg.weight_decay, "kahan_sum": True})
    optim, package = TRAINER_OPTIM[cfg.optimizer]
    if package:
        import importlib.util

        if importlib.util.find_spec(package[0]) is None:
            raise EloError(f"optimizer {cfg.optimizer} needs {package[1]}; pip install {package[1]}, or use optimizer=adamw")
    return optim, None


def optimizer_arguments(cfg: TrainConfig) -> dict:
    """The TrainingArguments an optimizer needs besides `optim`: galore's and apollo's target modules and rank."""
    if cfg.optimizer in ("galore", "apollo"):
        return {"optim_target_modules": LOW_RANK_TARGETS, "optim_args": f"rank={cfg.optimizer_rank}"}
    return {}
