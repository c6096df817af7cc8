"""`elo plan`: will ELO's stages (and the fft baseline) fit on these GPUs, what would make them fit, how long they take.

Per stage (stage 1: the shallow model training the selected layers; alignment: every parameter of the full model;
fft: the baseline, every parameter), the cost model's memory estimate (`costmodel.estimate_memory_bytes`: weights,
gradients (all of them, or the largest one with step_in_backward), optimizer state of the chosen optimizer,
activations with or without checkpointing, logits, FSDP/ZeRO-3 sharding over the GPUs) is compared with the GPU's
memory less a reserve (`USABLE`). When a stage does not fit, every combination of sharding, precision, optimizer,
checkpointing and step_in_backward is tried and the cheapest that fits is named, cheapest
by the penalties of `PENALTY` (what each change costs in time or in risk to the result). Times come from a
throughput: `tokens_per_s` measured for fft, or `gpu_tflops` at `UTILISATION`, scaled to each stage by the cost
model's FLOPs per token (and by the recomputed forward pass under checkpointing).

The memory model was checked against measured CPU peaks only (docs/benchmarks.md); CUDA allocator figures (caching,
fragmentation, the CUDA context) were never checked, which is what the reserve stands for.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from elo_cpt import benchmark, costmodel, hub, surgery
from elo_cpt.config import OPTIMIZERS, PRECISIONS, STEP_IN_BACKWARD_OPTIMIZERS
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info

#: Fraction of a GPU's memory the estimate may take: the rest is the reserve for the CUDA context, the caching
#: allocator and the runtime, none of which the cost model counts (never checked on a GPU).
USABLE = 0.9
#: Without --tokens: the fft baseline's training tokens (stage 1 takes 0.9 of them, alignment 0.1).
DEFAULT_TOKENS = 1e9
#: Without --tokens-per-s: dense bf16 TFLOP/s of one GPU (an H100 SXM's datasheet figure) at this utilisation.
DEFAULT_GPU_TFLOPS = 989.0
UTILISATION = 0.4
#: (stage, cost-model method, share of the tokens T).
STAGES = (("stage1", "elo", 0.9), ("align", "align", 0.1), ("fft", "fft", 1.0))
#: What departing from the stated setting costs, summed over the changes; the cheapest fitting combination wins
#: (ties: the smaller memory). Sharding costs communication; bf16-true rounds small updates unless Kahan-summed;
#: 8-bit and the other optimizers change the update itself; checkpointing recomputes the forward pass; step_in_backward
#: costs no time but gives up global gradient clipping (and gradient accumulation).
PENALTY = {"shard": 1, "precision": {"32-true": 1, "bf16-mixed": 0, "bf16-true": 2},
           "optimizer": {"adamw": 0, "adamw_kahan": 1, "adamw_8bit": 1, "adafactor": 2, "galore": 3, "apollo": 3},
           "checkpointing": 2, "step_in_backward": 2}


@dataclass(frozen=True)
class Setting:
    """One way to train a stage: precision, optimizer, activation checkpointing, FSDP/ZeRO-3 sharding over the GPUs,
    and the optimizer step inside the backward pass."""

    precision: str
    optimizer: str
    checkpointing: bool
    shard: bool
    step_in_backward: bool = False

    def allowed(self, gpus: int) -> bool:
        """bf16-true needs Kahan-summed AdamW (docs/training.md); sharding needs several GPUs; galore and apollo
        project whole matrices, so they are not planned with sharded parameters (never tested here); step_in_backward
        steps one weight at a time on one process, so only on one GPU and with adamw, adamw_kahan or adafactor."""
        kahan_ok = (self.precision == "bf16-true") == (self.optimizer == "adamw_kahan")
        in_backward_ok = not self.step_in_backward or (gpus == 1 and self.optimizer in STEP_IN_BACKWARD_OPTIMIZERS)
        return (kahan_ok and in_backward_ok and (not self.shard or gpus > 1)
                and not (self.shard and self.optimizer in ("galore", "apollo")))

    def penalty(self, stated: Setting) -> int:
        return (PENALTY["shard"] * (self.shard and not stated.shard)
                + (PENALTY["precision"][self.precision] if self.precision != stated.precision else 0)
                + (PENALTY["optimizer"][self.optimizer] if self.optimizer != stated.optimizer else 0)
                + PENALTY["checkpointing"] * (self.checkpointing and not stated.checkpointing)
                + PENALTY["step_in_backward"] * (self.step_in_backward and not stated.step_in_backward))

    def describe(self, gpus: int) -> str:
        shard = f"FSDP/ZeRO-3 over {gpus} GPUs" if self.shard else "no sharding"
        return (f"{self.precision}, {self.optimizer}, {'checkpointing' if self.checkpointing else 'no checkpointing'}, {shard}"
                + (", step in backward" if self.step_in_backward else ""))


def candidates(gpus: int) -> list[Setting]:
    """Every setting the search tries on `gpus` GPUs."""
    settings = itertools.product(("32-true", "bf16-mixed", "bf16-true"), OPTIMIZERS, (False, True), (False, True), (False, True))
    return [s for s in map(lambda c: Setting(*c), settings) if s.allowed(gpus)]


def model_config(model: str):
    """The config of a model folder, a hub id (config.json alone is fetched) or a named shape."""
    from transformers import AutoConfig

    if not Path(model).is_dir() and hub.is_hub_id(model):
        return AutoConfig.from_pretrained(hub.config_folder(model))
    return benchmark.load_config(model)


def estimate(shape: costmodel.Shape, method: str, layers: list[int], setting: Setting, gpus: int, batch: int, seq: int,
             loss_chunk: int, optimizer_rank: int) -> dict[str, int]:
    """Peak bytes per GPU of one step of `method` under `setting` (costmodel.estimate_memory_bytes)."""
    return costmodel.estimate_memory_bytes(
        shape, method, layers, batch, seq, loss_chunk, dtype_bytes=2 if setting.precision == "bf16-true" else 4,
        activation_bytes=4 if setting.precision == "32-true" else 2, optimizer=setting.optimizer,
        optimizer_rank=optimizer_rank, checkpointing=setting.checkpointing, shards=gpus if setting.shard else 1,
        step_in_backward=setting.step_in_backward)


def slowdown(shape: costmodel.Shape, method: str, layers: list[int], checkpointing: bool) -> float:
    """Compute of a step with checkpointing over without: the forward pass runs twice."""
    cost = costmodel.step_cost(shape, method, layers)
    return (cost.flops_per_token + cost.forward_flops) / cost.flops_per_token if checkpointing else 1.0


def plan(model: str, gpus: int = 1, gpu_memory: float = 80.0, precision: str = "bf16-mixed", optimizer: str = "adamw",
         checkpointing: bool = False, *, step_in_backward: bool = False, layers: str = "0,-1", batch: int = 4,
         seq: int = 256, loss_chunk: int = 1024, optimizer_rank: int = 128, tokens: float | None = None,
         tokens_per_s: float | None = None, gpu_tflops: float | None = None, json_path: str | Path | None = None) -> dict:
    """Per stage: estimated peak memory per GPU, whether it fits in `gpu_memory` GB (10^9 bytes) x USABLE, the
    cheapest setting that fits, and the time for its share of `tokens`; printed as a table and returned."""
    if gpus < 1 or gpu_memory <= 0 or min(batch, seq) < 1 or optimizer_rank < 1 or loss_chunk < 0:
        raise EloError("--gpus, --batch-size, --seq-len and --optimizer-rank must be >= 1, --gpu-memory > 0, --loss-chunk >= 0")
    if precision not in PRECISIONS or precision == "auto" or optimizer not in OPTIMIZERS:
        raise EloError(f"plan with a precision of {', '.join(PRECISIONS[1:])} and an optimizer of {', '.join(OPTIMIZERS)}")
    if any(v is not None and v <= 0 for v in (tokens, tokens_per_s, gpu_tflops)):
        raise EloError("--tokens, --tokens-per-s and --gpu-tflops must be positive")
    stated = Setting(precision, optimizer, checkpointing, False, step_in_backward)
    if step_in_backward and (gpus > 1 or optimizer not in STEP_IN_BACKWARD_OPTIMIZERS):
        raise EloError(f"--step-in-backward runs on one GPU with optimizer {', '.join(STEP_IN_BACKWARD_OPTIMIZERS)}, "
                       f"not on {gpus} with {optimizer}: plan with --gpus 1 and one of those, or without --step-in-backward")
    if not stated.allowed(gpus):
        raise EloError(f"precision bf16-true goes with optimizer adamw_kahan and only with it, not {optimizer}")
    shape = costmodel.Shape.from_config(model_config(model))
    absolute = surgery.resolve_layers(layers, shape.num_layers)
    budget = gpu_memory * 1e9 * USABLE
    tokens = tokens or DEFAULT_TOKENS
    fft_flops = costmodel.step_cost(shape, "fft", absolute).flops_per_token
    rate = tokens_per_s or gpus * (gpu_tflops or DEFAULT_GPU_TFLOPS) * 1e12 * UTILISATION / fft_flops
    tried = candidates(gpus)
    stages = {}
    for name, method, share in STAGES:
        args = (shape, method, absolute)
        stage_rate = rate * fft_flops / costmodel.step_cost(*args).flops_per_token
        memory = estimate(*args, stated, gpus, batch, seq, loss_chunk, optimizer_rank)
        row = {"method": method, "tokens": share * tokens, "memory_bytes": memory, "fits": memory["total"] <= budget,
               "seconds": share * tokens / stage_rate * slowdown(*args, checkpointing)}
        if not row["fits"]:
            fitting = [(c.penalty(stated), total, c) for c in tried
                       if (total := estimate(*args, c, gpus, batch, seq, loss_chunk, optimizer_rank)["total"]) <= budget]
            if fitting:
                _, total, best = min(fitting, key=lambda f: (f[0], f[1]))
                row["fix"] = {**asdict(best), "description": best.describe(gpus), "memory_total_bytes": total,
                              "seconds": share * tokens / stage_rate * slowdown(*args, best.checkpointing)}
            else:
                row["fix"] = None
        stages[name] = row
    result = {"model": str(model), "shape": asdict(shape), "gpus": gpus, "gpu_memory_gb": gpu_memory, "usable_fraction": USABLE,
              "setting": asdict(stated), "layers": absolute, "batch": batch, "seq": seq, "loss_chunk": loss_chunk,
              "optimizer_rank": optimizer_rank, "tokens": tokens, "fft_tokens_per_s": rate,
              "throughput_source": "--tokens-per-s" if tokens_per_s else f"{gpu_tflops or DEFAULT_GPU_TFLOPS:g} TFLOP/s per GPU at {UTILISATION:.0%}",
              "stages": stages}
    print(format_plan(result))
    if json_path:
        from elo_cpt.files import write_json

        write_json(Path(json_path), result)
    return result


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def format_plan(result: dict) -> str:
    gb = 1e9
    s = result["setting"]
    lines = [f"{result['model']}: {result['gpus']} GPU(s) x {result['gpu_memory_gb']:g} GB ({result['usable_fraction']:.0%} usable), "
             f"{s['precision']}, {s['optimizer']}, {'checkpointing' if s['checkpointing'] else 'no checkpointing'}"
             f"{', step in backward' if s.get('step_in_backward') else ''}, "
             f"batch {result['batch']} x {result['seq']} per GPU, layers {result['layers']}",
             f"{'stage':<7} {'peak/GPU':>9} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'logits':>7} {'fits':>4} "
             f"{'tokens':>9} {'time':>8}"]
    for name, row in result["stages"].items():
        m = row["memory_bytes"]
        lines.append(f"{name:<7} {m['total'] / gb:>6.1f} GB {m['weights'] / gb:>8.1f} {m['gradients'] / gb:>7.1f} "
                     f"{m['optimizer'] / gb:>7.1f} {m['activations'] / gb:>7.1f} {m['logits'] / gb:>7.1f} "
                     f"{'yes' if row['fits'] else 'NO':>4} {row['tokens']:>9.3g} {_hours(row['seconds']):>8}")
    for name, row in result["stages"].items():
        if row["fits"]:
            continue
        fix = row["fix"]
        lines.append(f"{name}: does not fit; " + (
            f"cheapest that fits: {fix['description']}: {fix['memory_total_bytes'] / gb:.1f} GB per GPU, {_hours(fix['seconds'])}"
            if fix else "nothing fits on these GPUs (more GPUs, more memory per GPU or a smaller batch)"))
    stage1, align, fft = (result["stages"][k] for k in ("stage1", "align", "fft"))
    elo = stage1["seconds"] + align["seconds"]
    lines.append(f"time: ELO {_hours(elo)} (stage 1 + alignment) vs fft {_hours(fft['seconds'])}, at "
                 f"{result['fft_tokens_per_s']:,.0f} fft tokens/s ({result['throughput_source']}), in the settings above")
    return "\n".join(lines)
