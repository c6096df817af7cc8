"""The tokenized cache: packed rows on disk, memory-mapped, keyed by what decides them.

An entry is `<key>.bin` (rows x seq_len token ids, uint16 or uint32) and `<key>.json` (what the key was computed
from, and the shape). The key covers the sources' content, fields and shares, the token budget, the tokenizer and
the sequence length, so a re-run with the same inputs reads the rows back and tokenizes nothing, and any change
makes a new entry. Entries are published by atomic renames, the .json last: a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from elo_cpt import files
from elo_cpt.corpus import Source, check_weights, source_digest
from elo_cpt.errors import EloError

#: Bump when the cache layout or the packing changes, so old entries are not reused.
CACHE_VERSION = 1


def too_small(tokens: int, seq_len: int, what: str) -> EloError:
    return EloError(f"{what} makes {tokens} tokens, less than one sequence of {seq_len}; give more text or lower seq_len")


def token_cache_dir() -> Path:
    """Where packed rows are cached: `$ELO_CPT_TOKEN_CACHE`, else `$ELO_CPT_CACHE/tokens`, else `~/.cache/elo-cpt/tokens`."""
    if os.environ.get("ELO_CPT_TOKEN_CACHE"):
        return Path(os.environ["ELO_CPT_TOKEN_CACHE"]).expanduser()
    return files.cache_root() / "tokens"


def tokenizer_digest(tokenizer, separator: int) -> str:
    """sha256 of what decides the token ids: the tokenizer's full definition (vocabulary, merges, normaliser,
    pre-tokenizer, added tokens) and the separator id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{separator}\0{spec}".encode()).hexdigest()


def cache_key(sources: list[Source], tokenizer, separator: int, seq_len: int, n_tokens: int | None) -> tuple[str, dict]:
    """The cache key of a packed dataset, and what it was computed from."""
    mixing = n_tokens is not None and len(sources) > 1
    shares = check_weights([s.weight for s in sources], [str(s.path) for s in sources]) if mixing else [None] * len(sources)
    inputs = {
        "version": CACHE_VERSION,
        "sources": [{"path": str(s.path), "content_sha256": source_digest(s), "field": s.field, "share": share}
                    for s, share in zip(sources, shares)],
        "tokenizer_sha256": tokenizer_digest(tokenizer, separator),
        "seq_len": seq_len,
        "n_tokens": n_tokens,
    }
    keyed = {**inputs, "sources": [{k: v for k, v in s.items() if k != "path"} for s in inputs["sources"]]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:32], inputs


def cached_rows(folder: Path, key: str, seq_len: int) -> np.memmap | None:
    """The rows of a complete cache entry, memory-mapped; None if there is none (or it is incomplete)."""
    meta_path, bin_path = folder / f"{key}.json", folder / f"{key}.bin"
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        shape = (int(meta["rows"]), int(meta["seq_len"]))
        if meta.get("version") != CACHE_VERSION or shape[1] != seq_len or shape[0] < 1:
            return None
        if bin_path.stat().st_size != shape[0] * shape[1] * dtype.itemsize:
            return None
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_rows(chunks: Iterable[np.ndarray], folder: Path, key: str, seq_len: int, max_rows: int | None,
                dtype: np.dtype, meta: dict, what: str) -> np.memmap:
    """Append the chunks to a temporary file, cut it to whole rows, then publish it under the key: the .bin
    first, the .json (which marks the entry complete) last, each by an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    limit = np.iinfo(dtype).max
    with files.replacing(bin_path) as tmp:
        tokens = 0
        with tmp.open("wb") as f:
            for chunk in chunks:
                if len(chunk) and chunk.max() > limit:
                    raise EloError(f"token id {int(chunk.max())} does not fit the cache's {dtype.name}; report this")
                f.write(chunk.astype(dtype).tobytes())
                tokens += len(chunk)
            rows = tokens // seq_len if max_rows is None else min(max_rows, tokens // seq_len)
            if rows == 0:
                raise too_small(tokens, seq_len, what)
            f.truncate(rows * seq_len * dtype.itemsize)
        if max_rows is not None and rows < max_rows:
            raise EloError(
                f"{what} makes {rows * seq_len:,} tokens, fewer than the {max_rows * seq_len:,} asked for; "
                "lower the token budget or give more text"
            )
    files.write_json(meta_path, {**meta, "rows": rows, "seq_len": seq_len, "dtype": dtype.str, "tokens": rows * seq_len})
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(rows, seq_len))


def resolve_cache(cache_dir) -> Path | None:
    if cache_dir is None or cache_dir is False:
        return None
    return token_cache_dir() if cache_dir is True else Path(cache_dir).expanduser()
