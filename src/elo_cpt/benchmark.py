"""`elo bench`: tokens/s and peak memory of one training step per method, next to the cost model's bound.

Each method runs in a fresh subprocess (so peaks do not mix) that builds its model, runs `warmup` steps, then
times `steps` steps of the same computation training does: forward, the vocabulary loss in chunks (as
`EloTrainer` does when `loss_chunk` > 0), backward, gradient clipping, AdamW on the trainable parameters only.
Peak memory is the process's VmHWM on CPU (including the Python/torch runtime, reported separately as
`baseline_rss_bytes`), CUDA max_memory_allocated on GPU.

Methods: elo (the shallow model: embedding, the selected layers, norm, head; only the layers train), freeze (the
selected layers train, the whole model is computed), lora (rank-16 adapters on every linear layer), fft (every
parameter), align (the alignment as configured: fft of the full model with `align_method`'s optimizer, built by
Trainer's own code, with activation checkpointing and `step_in_backward` if asked (then each weight steps inside the
backward pass and the loop's step and clipping do nothing); with AdamW and neither, the same computation as fft),
and elo-logits (elo with the full logits, loss_chunk=0, to show what the chunked loss saves).
`pipeline_peak_vs_fft` is ELO's memory need against fft's: max(elo peak, align peak) / fft peak, each peak net of
the runtime (`net_peak_bytes`: VmHWM minus the VmRSS before the model was built on CPU; max_memory_allocated on CUDA;
the estimate for a row not run).
A method whose estimated memory exceeds the machine's is not run; its row carries the estimate, flagged.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from elo_cpt import costmodel, hub, study_report
from elo_cpt import precision as precision_mod
from elo_cpt.config import BF16_TRUE_NEEDS, OPTIMIZERS, PRECISIONS, STEP_IN_BACKWARD_OPTIMIZERS, TrainConfig
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)

METHODS = ("elo", "freeze", "lora", "fft", "align", "elo-logits")

#: Published sizes of common models, built with random weights (model_type, config).
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                                   max_position_embeddings=8192)),
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                   num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                                   max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                                   max_position_embeddings=32768)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                                   rope_theta=500000.0, max_position_embeddings=131072)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                                   rope_theta=500000.0, max_position_embeddings=131072)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128, vocab_size=32768, tie_word_embeddings=False,
                                   rope_theta=1000000.0, sliding_window=None, max_position_embeddings=32768)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                               max_position_embeddings=32768)),
}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").removesuffix("-instruct")


def load_config(model: str):
    """The config of a model folder, or of a named shape (case-insensitive, e.g. Llama-3.1-8B)."""
    from transformers import AutoConfig

    if Path(model).is_dir():
        return AutoConfig.from_pretrained(model)
    if _normalise(model) in SHAPES:
        model_type, settings = SHAPES[_normalise(model)]
        return AutoConfig.for_model(model_type, **settings)
    raise EloError(f"{model!r} is neither a model folder nor a known shape; use a folder or one of {', '.join(SHAPES)}")


def build_model(model: str, method: str, layers: list[int], lora_rank: int, dtype):
    """The model one method trains, with requires_grad set as training sets it."""
    from transformers import AutoModelForCausalLM

    from elo_cpt import checkpoint, surgery, train

    folder = Path(model).is_dir()
    config = load_config(model)
    spec = ",".join(map(str, layers))
    if method.startswith("elo"):
        if folder:
            shallow, _ = surgery.build_shallow(model, spec)
        else:  # only the shallow model is ever built: 2 layers of an 8B shape, not 32
            shallow = AutoModelForCausalLM.from_config(surgery.shallow_config(config, layers), dtype=dtype)
        net = shallow.to(dtype)
        train.train_only_layers(net)
        return net
    net = checkpoint.load_model(model).to(dtype) if folder else AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method == "freeze":
        train.train_only_layers(net, layers)
    elif method == "lora":
        net = train.with_lora(net, lora_rank)
    else:
        net.requires_grad_(True)
    return net


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model: str, method: str, layers: list[int], batch: int, seq: int, steps: int, warmup: int,
            loss_chunk: int, lora_rank: int, precision: str, seed: int = 0, optimizer: str = "adamw",
            checkpointing: bool = False, step_in_backward: bool = False) -> dict:
    """Time `steps` training steps of one method in this process; return tokens/s and peak memory. `optimizer`,
    `checkpointing` and `step_in_backward` apply to the align row only."""
    import importlib

    import torch

    from elo_cpt import engine

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32  # bf16-mixed: fp32 weights, bf16 autocast
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    align_cfg = TrainConfig(lr=1e-5, optimizer=optimizer, gradient_checkpointing=checkpointing, step_in_backward=step_in_backward)
    if method == "align":  # the optimizer's package loads before the baseline: runtime, not training memory
        precision_mod.optimizer(align_cfg)
        package = precision_mod.TRAINER_OPTIM.get(optimizer, (None, None))[1]
        if package:
            importlib.import_module(package[0])
    baseline = _status_bytes("VmRSS")
    torch.manual_seed(seed)
    build_start = time.perf_counter()
    net = build_model(model, method, layers, lora_rank, dtype).to(device)
    build_seconds = time.perf_counter() - build_start
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    # as training: bf16-true steps with Kahan summation (torch-optimi), the others with torch's AdamW
    _, custom = precision_mod.optimizer(TrainConfig(lr=1e-5, optimizer="adamw_kahan" if precision == "bf16-true" else "adamw"))
    if method == "align":  # as the alignment trains: Trainer's own construction of the configured optimizer
        if checkpointing:
            net.gradient_checkpointing_enable()
        optimizer = engine.make_optimizer(net, align_cfg)
    else:
        optimizer = custom[0](params, **custom[1]) if custom else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    chunk = 0 if method == "elo-logits" else loss_chunk
    chunk = chunk if chunk and engine.supports_chunked_loss(net, distributed=False) else 0
    vocab = net.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        ids = torch.randint(vocab, (batch, seq), generator=generator).to(device)
        with autocast:
            loss = forward_loss(ids)
        loss.backward()  # with step_in_backward every weight has stepped here, and step and zero_grad do nothing
        if not step_in_backward:  # as training: no global gradient norm to clip by (max_grad_norm is ignored)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def forward_loss(ids):
        # the loss EloTrainer computes; the optimizer step is a plain loop, as Trainer's own step adds nothing to time
        return engine.model_lm_loss(net, ids, ids, chunk) if chunk else net(input_ids=ids, labels=ids).loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "tokens_per_s": batch * seq * steps / sum(times),
        "step_seconds": times,
        "median_step_s": statistics.median(times),
        "peak_memory_bytes": (peak := torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")),
        "net_peak_bytes": peak if cuda else peak - baseline,
        "memory_kind": "cuda max_memory_allocated" if cuda else "process VmHWM (RSS peak)",
        "baseline_rss_bytes": baseline,
        "build_seconds": build_seconds,
        "trainable_params": sum(p.numel() for p in params),
        "loss_chunk": chunk,
        "device": str(device),
    }


def _available_bytes() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
    except ImportError:
        pass
    return _status_bytes_meminfo("MemAvailable")


def _status_bytes_meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def bench(model: str, methods: list[str] | str = "elo,freeze,lora,fft,align", batch: int = 4, seq: int = 256,
          steps: int = 3, warmup: int = 1, layers: str = "0,-1", loss_chunk: int = 1024, lora_rank: int = 16,
          precision: str = "auto", json_path: str | Path | None = None, force: bool = False,
          align_method: str | None = None, align_checkpointing: bool = False, align_step_in_backward: bool = False) -> dict:
    """Benchmark each method in a fresh subprocess; return (and optionally write) the results with the cost model.
    The align row trains with optimizer `align_method` (default adamw; adamw_kahan under bf16-true), with
    `align_checkpointing` activation checkpointing, with `align_step_in_backward` each weight stepped inside the
    backward pass (align.step_in_backward; adamw, adamw_kahan or adafactor)."""
    from elo_cpt import surgery

    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not Path(model).is_dir() and hub.is_hub_id(str(model)):
        from elo_cpt import checkpoint

        model = str(checkpoint.require_model_dir(model))  # a hub id: its cache folder, fetched once for every method
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EloError(f"unknown method {unknown[0]!r}; use some of {', '.join(METHODS)}")
    if min(batch, seq, steps) < 1 or warmup < 0 or seq < 2:
        raise EloError("--batch, --steps must be >= 1, --seq >= 2 and --warmup >= 0")
    config = load_config(model)
    shape = costmodel.Shape.from_config(config)
    absolute = surgery.resolve_layers(layers, shape.num_layers)
    if precision not in PRECISIONS:
        raise EloError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    precision = precision_mod.resolve(precision)
    align_method = align_method or ("adamw_kahan" if precision == "bf16-true" else "adamw")
    if align_method not in OPTIMIZERS:
        raise EloError(f"unknown --align-method {align_method!r}; use one of {', '.join(OPTIMIZERS)}")
    if precision == "bf16-true" and align_method != "adamw_kahan":
        raise EloError(f"--align-method {align_method} with precision bf16-true: bf16-true {BF16_TRUE_NEEDS}")
    if align_step_in_backward and align_method not in STEP_IN_BACKWARD_OPTIMIZERS:
        raise EloError(f"--align-step-in-backward steps one weight at a time, which --align-method {align_method} cannot: "
                       f"use --align-method {', '.join(STEP_IN_BACKWARD_OPTIMIZERS)}, or leave --align-step-in-backward off")
    dtype_bytes = 2 if precision == "bf16-true" else 4
    activation_bytes = 4 if precision == "32-true" else 2
    available = _available_bytes()
    rows = {}
    for method in methods:
        cost_method = "elo" if method == "elo-logits" else method
        cost = costmodel.step_cost(shape, cost_method, absolute, lora_rank)
        chunk = 0 if method == "elo-logits" else loss_chunk
        options = dict(optimizer=align_method, checkpointing=align_checkpointing,
                       step_in_backward=align_step_in_backward) if method == "align" else {}
        estimate = costmodel.estimate_memory_bytes(shape, cost_method, absolute, batch, seq, chunk, lora_rank, dtype_bytes,
                                                  activation_bytes, **options)
        row = {"flops_per_token": cost.flops_per_token, "forward_flops_per_token": cost.forward_flops,
               "trainable_params": cost.trainable_params, "estimated_memory_bytes": estimate["total"],
               "estimated_memory_breakdown": estimate, "measured": False}
        if method == "align":
            row.update(optimizer=align_method, gradient_checkpointing=align_checkpointing,
                       step_in_backward=align_step_in_backward)
        if estimate["total"] > available and not force:
            row.update(peak_memory_bytes=estimate["total"], net_peak_bytes=estimate["total"], peak_memory_estimated=True, tokens_per_s=None,
                       note=f"not run: estimated {estimate['total'] / 2**30:.1f} GiB exceeds the {available / 2**30:.1f} GiB available")
            log(f"{method}: {row['note']}")
        else:
            log(f"{method}: running {warmup} warm-up + {steps} timed steps ...")
            args = dict(model=str(model), method=method, layers=absolute, batch=batch, seq=seq, steps=steps, warmup=warmup,
                        loss_chunk=loss_chunk, lora_rank=lora_rank, precision=precision,
                        **({"optimizer": align_method, "checkpointing": align_checkpointing,
                            "step_in_backward": align_step_in_backward} if method == "align" else {}))
            row.update(_run_isolated(args), measured=True, peak_memory_estimated=False)
        rows[method] = row
    result = {
        "model": str(model), "shape": shape.__dict__, "layers": absolute, "batch": batch, "seq": seq, "steps": steps,
        "warmup": warmup, "loss_chunk": loss_chunk, "lora_rank": lora_rank, "precision": precision,
        "machine": study_report.machine(), "methods": rows, "align_method": align_method,
        "align_checkpointing": align_checkpointing, "align_step_in_backward": align_step_in_backward,
    }
    _add_ratios(result, shape, absolute, lora_rank)
    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run_isolated(args: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "elo_cpt.benchmark", json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EloError(f"benchmark of {args['method']} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _add_ratios(result: dict, shape: costmodel.Shape, layers: list[int], lora_rank: int) -> None:
    rows = result["methods"]
    fft_flops = costmodel.step_cost(shape, "fft", layers, lora_rank).flops_per_token
    fft = rows.get("fft") or rows.get("align")
    fft_rate = fft.get("tokens_per_s") if fft else None
    for row in rows.values():
        row["bound_speedup_vs_fft"] = fft_flops / row["flops_per_token"]
        rate = row.get("tokens_per_s")
        row["measured_speedup_vs_fft"] = rate / fft_rate if rate and fft_rate else None
        row["efficiency"] = row["measured_speedup_vs_fft"] / row["bound_speedup_vs_fft"] if row["measured_speedup_vs_fft"] else None
    elo_flops = costmodel.step_cost(shape, "elo", layers, lora_rank).flops_per_token
    pipeline = {"stage1_share": 0.9, "bound_speedup_vs_fft": costmodel.pipeline_speedup(1 / elo_flops, 1 / fft_flops, 1 / fft_flops)}
    align = rows.get("align") or rows.get("fft")
    if rows.get("elo", {}).get("tokens_per_s") and fft_rate and align and align.get("tokens_per_s"):
        pipeline["measured_speedup_vs_fft"] = costmodel.pipeline_speedup(rows["elo"]["tokens_per_s"], align["tokens_per_s"], fft_rate)
    else:
        pipeline["measured_speedup_vs_fft"] = None
    result["pipeline_9_1"] = pipeline
    # ELO needs the larger of its two stages' memory; every row net of the runtime, by the same rule
    peaks = {name: rows[name]["net_peak_bytes"] for name in ("elo", "align", "fft") if name in rows}
    result["pipeline_peak_vs_fft"] = max(peaks["elo"], peaks["align"]) / peaks["fft"] if len(peaks) == 3 else None


def _fmt(value, spec: str, scale: float = 1.0, missing: str = "-") -> str:
    return missing if value is None else format(value / scale, spec)


def format_table(result: dict) -> str:
    lines = [f"{result['model']}  batch {result['batch']} x seq {result['seq']}, {result['steps']} timed steps after "
             f"{result['warmup']} warm-up, layers {result['layers']}, loss chunk {result['loss_chunk']}, {result.get('precision', result.get('dtype'))}",
             f"{'method':<11} {'tokens/s':>9} {'peak mem':>11} {'trainable':>12} {'GFLOP/tok':>9} {'bound':>6} {'measured':>8} {'effic.':>6}"]
    for name, row in result["methods"].items():
        memory = _fmt(row["peak_memory_bytes"], ".2f", 2**30) + (" GiB*" if row.get("peak_memory_estimated") else " GiB ")
        lines.append(f"{name:<11} {_fmt(row.get('tokens_per_s'), '.1f'):>9} {memory:>11} {row['trainable_params']:>12,} "
                     f"{row['flops_per_token'] / 1e9:>9.3f} {row['bound_speedup_vs_fft']:>5.2f}x "
                     f"{_fmt(row['measured_speedup_vs_fft'], '.2f'):>7}x {_fmt(row['efficiency'], '.2f'):>6}")
    pipe = result["pipeline_9_1"]
    lines.append(f"pipeline at 9:1 (stage 1 on 0.9 T + alignment on 0.1 T vs fft on T): bound {pipe['bound_speedup_vs_fft']:.2f}x, "
                 f"measured {_fmt(pipe['measured_speedup_vs_fft'], '.2f')}x")
    if result.get("pipeline_peak_vs_fft") is not None:
        lines.append(f"pipeline peak memory (max of elo and align, align with {result['align_method']}"
                     f"{' + checkpointing' if result['align_checkpointing'] else ''}"
                     f"{' + step in backward' if result.get('align_step_in_backward') else ''}) vs fft, net of the runtime: "
                     f"{result['pipeline_peak_vs_fft']:.2f}x")
    if any(row.get("peak_memory_estimated") for row in result["methods"].values()):
        lines.append("* estimated, not run (weights + gradients + optimizer state + activations + logits)")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: one method in a fresh process, result as one JSON line on stdout
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
