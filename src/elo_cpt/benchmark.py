"""`elo bench`: tokens/s and peak memory of one training step per method, next to the cost model's bound.

Each method runs in a fresh subprocess (so peaks do not mix) that builds its model, runs `warmup` steps, then
times `steps` steps of the same computation training does: forward, the vocabulary loss in chunks (as
`EloTrainer` does when `loss_chunk` > 0), backward, gradient clipping, AdamW on the trainable parameters only.
Peak memory is the process's VmHWM on CPU (including the Python/torch runtime, reported separately as
`baseline_rss_bytes`), CUDA max_memory_allocated on GPU.

Methods: elo (the shallow model: embedding, the selected layers, norm, head; only the layers train), freeze (the
selected layers train, the whole model is computed), lora (rank-16 adapters on every linear layer), fft (every
parameter), align (fft of the full model: the same computation as fft, its own row), and elo-logits (elo with the
full logits, loss_chunk=0, to show what the chunked loss saves).
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
from elo_cpt.config import PRECISIONS, TrainConfig
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)

METHODS = ("elo", "freeze", "lora", "fft", "align", "elo-logits")

#: Published sizes of common models, built with random weights (model_type, config).
SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                                   max_position_embeddings=8192)),
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
            loss_chunk: int, lora_rank: int, precision: str, seed: int = 0) -> dict:
    """Time `steps` training steps of one method in this process; return tokens/s and peak memory."""
    import torch

    from elo_cpt import engine

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32  # bf16-mixed: fp32 weights, bf16 autocast
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    baseline = _status_bytes("VmRSS")
    torch.manual_seed(seed)
    build_start = time.perf_counter()
    net = build_model(model, method, layers, lora_rank, dtype).to(device)
    build_seconds = time.perf_counter() - build_start
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    # as training: bf16-true steps with Kahan summation (torch-optimi), the others with torch's AdamW
    _, custom = precision_mod.optimizer(TrainConfig(lr=1e-5, optimizer="adamw_kahan" if precision == "bf16-true" else "adamw"))
    optimizer = custom[0](params, **custom[1]) if custom else torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    chunk = 0 if method == "elo-logits" else loss_chunk
    chunk = chunk if chunk and engine.supports_chunked_loss(net, distributed=False) else 0
    vocab = net.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        ids = torch.randint(vocab, (batch, seq), generator=generator).to(device)
        with autocast:
            loss = forward_loss(ids)
        loss.backward()
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
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM"),
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
          precision: str = "auto", json_path: str | Path | None = None, force: bool = False) -> dict:
    """Benchmark each method in a fresh subprocess; return (and optionally write) the results with the cost model."""
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
    dtype_bytes = 2 if precision == "bf16-true" else 4
    activation_bytes = 4 if precision == "32-true" else 2
    available = _available_bytes()
    rows = {}
    for method in methods:
        cost_method = "elo" if method == "elo-logits" else method
        cost = costmodel.step_cost(shape, cost_method, absolute, lora_rank)
        chunk = 0 if method == "elo-logits" else loss_chunk
        estimate = costmodel.estimate_memory_bytes(shape, cost_method, absolute, batch, seq, chunk, lora_rank, dtype_bytes,
                                                  activation_bytes)
        row = {"flops_per_token": cost.flops_per_token, "forward_flops_per_token": cost.forward_flops,
               "trainable_params": cost.trainable_params, "estimated_memory_bytes": estimate["total"],
               "estimated_memory_breakdown": estimate, "measured": False}
        if estimate["total"] > available and not force:
            row.update(peak_memory_bytes=estimate["total"], peak_memory_estimated=True, tokens_per_s=None,
                       note=f"not run: estimated {estimate['total'] / 2**30:.1f} GiB exceeds the {available / 2**30:.1f} GiB available")
            log(f"{method}: {row['note']}")
        else:
            log(f"{method}: running {warmup} warm-up + {steps} timed steps ...")
            args = dict(model=str(model), method=method, layers=absolute, batch=batch, seq=seq, steps=steps, warmup=warmup,
                        loss_chunk=loss_chunk, lora_rank=lora_rank, precision=precision)
            row.update(_run_isolated(args), measured=True, peak_memory_estimated=False)
        rows[method] = row
    result = {
        "model": str(model), "shape": shape.__dict__, "layers": absolute, "batch": batch, "seq": seq, "steps": steps,
        "warmup": warmup, "loss_chunk": loss_chunk, "lora_rank": lora_rank, "precision": precision,
        "machine": study_report.machine(), "methods": rows,
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
    if any(row.get("peak_memory_estimated") for row in result["methods"].values()):
        lines.append("* estimated, not run (weights + 12 bytes/trainable parameter + activations + logits)")
    return "\n".join(lines)


# ---------------------------------------------------------------- data: tokenize + pack throughput


def _tokenize_shard(args: tuple[str, list[str]]):
    """Worker of the multi-process setting: token ids of one shard of documents (one thread per process)."""
    import numpy as np

    from elo_cpt import checkpoint, data

    tokenizer_dir, documents = args
    if tokenizer_dir not in _SHARD_TOKENIZERS:  # once per worker process
        _SHARD_TOKENIZERS[tokenizer_dir] = checkpoint.load_tokenizer(tokenizer_dir)
    return np.concatenate(list(data.token_chunks(documents, _SHARD_TOKENIZERS[tokenizer_dir])))


_SHARD_TOKENIZERS: dict = {}


def tokenization_worker(sources: list[str], tokenizer_dir: str, seq_len: int, max_documents: int | None,
                        processes: int, end_to_end: bool) -> dict:
    """One setting of `bench_tokenization`, in this (fresh) process: read, then time tokenize + pack."""
    import multiprocessing
    import tempfile

    import numpy as np

    from elo_cpt import checkpoint, corpus, data

    tokenizer = checkpoint.load_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    documents = []
    for source in sources:
        documents.extend(corpus.source_documents(source))
    documents = documents[:max_documents] if max_documents else documents
    read_s = time.perf_counter() - start
    tokenizer(documents[:10], add_special_tokens=False)  # warm-up, untimed
    start = time.perf_counter()
    if processes > 1:
        shards = [(tokenizer_dir, documents[i : i + corpus.TOKENIZE_BATCH]) for i in range(0, len(documents), corpus.TOKENIZE_BATCH)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            ids = np.concatenate(pool.map(_tokenize_shard, shards))
    else:
        ids = np.concatenate(list(data.token_chunks(documents, tokenizer)))
    rows = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    seconds = time.perf_counter() - start
    result = {"documents": len(documents), "characters": sum(map(len, documents)),
              "utf8_bytes": sum(len(d.encode()) for d in documents), "tokens": int(len(ids)), "rows": int(rows.shape[0]),
              "read_s": read_s, "tokenize_pack_s": seconds}
    if end_to_end:  # the real path: hash the sources, read, tokenize, pack, write the memory-mapped cache; then a hit
        with tempfile.TemporaryDirectory() as cache:
            timed = {}
            for run in ("cold", "warm"):
                start = time.perf_counter()
                data.load_training_data(sources, tokenizer, seq_len, None if not max_documents else len(ids) // seq_len * seq_len,
                                        cache_dir=cache)
                timed[run] = time.perf_counter() - start
        result.update(load_cold_s=timed["cold"], load_warm_s=timed["warm"])
    return result


def bench_tokenization(sources: list[str] | str, tokenizer_dir: str | Path, seq_len: int = 256, max_documents: int | None = None,
                       workers: int | None = None, json_path: str | Path | None = None) -> dict:
    """Documents/s, characters/s and tokens/s of tokenize + pack (the fast tokenizer on batches of
    `corpus.TOKENIZE_BATCH` documents, ids joined by the separator, cut into rows of `seq_len`).

    Settings, each in a fresh process: the tokenizer on one thread; and, with `workers` > 1 (default: the CPU
    count), on `workers` threads (its own batch parallelism, which `load_training_data` uses unless
    TOKENIZERS_PARALLELISM=false) and in `workers` processes of one thread each. Reading is timed separately; the
    last setting `load_training_data` uses also times it end to end, cold (hash + read + tokenize + pack + write
    the cache) and warm (a cache hit).
    """
    from elo_cpt import checkpoint, corpus

    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise EloError("give the corpus to tokenize with --data PATH")
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file() and not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise EloError(f"{tokenizer_dir} holds no tokenizer; give a model folder")
    if seq_len < 2:
        raise EloError("--seq must be >= 2")
    checkpoint.load_tokenizer(tokenizer_dir)  # fails here, not in every worker, if it cannot be loaded
    workers = workers or os.cpu_count() or 1
    one_thread = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    settings = [("1 thread", 1, one_thread, workers == 1)]
    if workers > 1:
        settings += [(f"{workers} threads", 1, {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(workers)}, True),
                     (f"{workers} processes", workers, one_thread, False)]
    rows = {}
    for name, processes, env, end_to_end in settings:
        log(f"tokenize + pack, {name} ...")
        args = dict(sources=[str(s) for s in sources], tokenizer_dir=str(tokenizer_dir), seq_len=seq_len,
                    max_documents=max_documents, processes=processes, end_to_end=end_to_end)
        code = "import json, sys; from elo_cpt.benchmark import tokenization_worker as w; print(json.dumps(w(**json.loads(sys.argv[1]))))"
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EloError(f"tokenization benchmark ({name}) failed (exit {proc.returncode}): {tail}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        seconds = row["tokenize_pack_s"]
        row.update(documents_per_s=row["documents"] / seconds, characters_per_s=row["characters"] / seconds,
                   tokens_per_s=row["tokens"] / seconds)
        rows[name] = row
    result = {"sources": [str(s) for s in sources], "tokenizer": str(tokenizer_dir), "seq": seq_len,
              "batch_documents": corpus.TOKENIZE_BATCH, "machine": study_report.machine(), "settings": rows}
    print(format_tokenization_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_tokenization_table(result: dict) -> str:
    first = next(iter(result["settings"].values()))
    lines = [f"tokenize + pack {first['documents']:,} documents ({first['characters']:,} characters, {first['tokens']:,} tokens) "
             f"into rows of {result['seq']}, read in {first['read_s']:.2f} s; {result['machine']['cpu_count']} CPUs",
             f"{'setting':<12} {'seconds':>8} {'docs/s':>9} {'chars/s':>11} {'tokens/s':>10}"]
    for name, row in result["settings"].items():
        lines.append(f"{name:<12} {row['tokenize_pack_s']:>8.2f} {row['documents_per_s']:>9,.0f} {row['characters_per_s']:>11,.0f} "
                     f"{row['tokens_per_s']:>10,.0f}")
    for name, row in result["settings"].items():
        if "load_cold_s" in row:
            lines.append(f"load_training_data ({name}): {row['load_cold_s']:.2f} s cold (hash, read, tokenize, pack, write "
                         f"the cache), {row['load_warm_s']:.3f} s warm (cache hit)")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: one method in a fresh process, result as one JSON line on stdout
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
