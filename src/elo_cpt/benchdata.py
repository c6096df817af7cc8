"""`elo bench --data`: documents, characters and tokens per second of tokenize + pack, each setting in a fresh process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from elo_cpt import study_report
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info


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
        code = "import json, sys; from elo_cpt.benchdata import tokenization_worker as w; print(json.dumps(w(**json.loads(sys.argv[1]))))"
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
