"""Training text: read corpora, mix sources by byte share, tokenize and pack into fixed-length sequences.

A source is a file, a folder (every .txt, .jsonl and .parquet file under it, in name order), a glob, or a
Hugging Face dataset folder written by `Dataset.save_to_disk`:

    .txt       documents separated by blank lines
    .jsonl     one JSON object per line; the document is its `text` field (or another: PATH#FIELD)
    .parquet   one document per row, in the `text` column (or PATH#FIELD)
    dataset    a `save_to_disk` folder; the `text` column (or PATH#FIELD)

Sources are written `PATH[#FIELD][@WEIGHT]`; weights are relative shares of UTF-8 bytes (normalised to sum to
1), as in the paper.

Packed rows are cached on disk (`<cache>/tokens`, memory-mapped), keyed by the sources' content, the field,
the weights, the token budget, the tokenizer and the sequence length, so a re-run never tokenizes again.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from elo_cpt.errors import EloError

TEXT_FIELD = "text"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
#: Documents per call of the (fast, batched) tokenizer.
TOKENIZE_BATCH = 1000
#: Bump when the cache layout or the packing changes, so old entries are not reused.
CACHE_VERSION = 1
#: Held-out paragraphs and lines shorter than this (after collapsing whitespace) are not checked for overlap.
MIN_OVERLAP_CHARS = 40


@dataclass(frozen=True)
class Source:
    """One corpus, the field its documents are in, and its share of the mixture."""

    path: Path
    weight: float = 1.0
    field: str = TEXT_FIELD

    @classmethod
    def parse(cls, spec: str | Source) -> Source:
        """Parse `PATH[#FIELD][@WEIGHT]`."""
        if isinstance(spec, Source):
            return spec
        path, _, weight = str(spec).rpartition("@") if "@" in str(spec) else (str(spec), "", "1")
        path, _, field = path.partition("#")
        try:
            value = float(weight)
        except ValueError:
            raise EloError(f"bad data source {spec!r}: the weight after @ must be a number, e.g. corpus.jsonl@0.9") from None
        if not math.isfinite(value) or value <= 0:
            raise EloError(f"bad data source {spec!r}: the weight must be a positive number (a relative byte share, e.g. @0.9)")
        return cls(Path(path), value, field or TEXT_FIELD)


def check_weights(weights: list[float], names: list[str]) -> list[float]:
    """The weights normalised to sum to 1; an EloError naming the source if one is not a positive finite number."""
    for weight, name in zip(weights, names):
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise EloError(f"{name}: weight {weight!r} is not a positive number; weights are relative byte shares, e.g. 9 and 1 for 90%:10%")
    total = sum(weights)
    return [w / total for w in weights]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def source_files(path: str | Path) -> list[Path]:
    """The files (or saved dataset folders) a source names, in a stable order."""
    path = Path(path)
    if any(ch in str(path) for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in found if p.suffix in FILE_SUFFIXES and p.is_file() or _is_saved_dataset(p)]
        if not files:
            raise EloError(f"no .txt, .jsonl or .parquet file matches {path}; check the pattern")
        return files
    if _is_saved_dataset(path) or path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise EloError(f"folder {path} holds no .txt, .jsonl or .parquet file")
        return files
    raise EloError(f"corpus {path} does not exist; check the path")


# ---------------------------------------------------------------- reading, one document at a time


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a text file, streamed; invalid UTF-8 is replaced, with a warning
    at the end saying how much."""
    replaced = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    replaced += line.count("\ufffd") - raw.count("\ufffd".encode())
                yield number, line
    except OSError as err:
        raise EloError(f"cannot read {path}: {err.strerror or err}") from None
    if replaced:
        print(f"warning: {path}: {replaced} invalid UTF-8 byte sequence(s) replaced with U+FFFD", file=sys.stderr)


def _txt_documents(path: Path) -> Iterator[str]:
    """Blocks of a text file separated by blank (or whitespace-only) lines."""
    lines: list[str] = []
    for _, line in _text_lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EloError(f"{path}:{number} is not valid JSON; each line must be an object with a {field!r} field") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise EloError(f"{path}:{number} has no string field {field!r}; name the field with PATH#FIELD")
        yield record[field]


def _no_column(path: Path, field: str, names: list[str]) -> EloError:
    return EloError(f"{path} has no column {field!r} (it has {', '.join(names)}); name it with PATH#COLUMN")


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    """Rows of one column of a Parquet file, a record batch at a time."""
    import pyarrow.parquet as pq

    def unreadable(err: Exception) -> EloError:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return EloError(f"cannot read Parquet file {path}: {reason}")

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as err:  # pyarrow raises several types for damaged files
        raise unreadable(err) from None
    if field not in names:
        raise _no_column(path, field, names)
    try:
        for batch in parquet.iter_batches(batch_size=TOKENIZE_BATCH, columns=[field]):
            yield from (value for value in batch.column(0).to_pylist() if isinstance(value, str))
    except EloError:
        raise
    except Exception as err:
        raise unreadable(err) from None


def _dataset_documents(path: Path, field: str) -> Iterator[str]:
    """Rows of one column of a `save_to_disk` folder (memory-mapped Arrow), a slice at a time."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise EloError(f"{path} holds several splits ({', '.join(dataset)}); point at one split's folder")
    if field not in dataset.column_names:
        raise _no_column(path, field, dataset.column_names)
    column = dataset.select_columns([field])
    for start in range(0, len(column), TOKENIZE_BATCH):
        yield from (value for value in column[start : start + TOKENIZE_BATCH][field] if isinstance(value, str))


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, field)
    if path.suffix == ".parquet":
        return _parquet_documents(path, field)
    if _is_saved_dataset(path):
        return _dataset_documents(path, field)
    return _txt_documents(path)


def iter_documents(path: str | Path, field: str = TEXT_FIELD) -> Iterator[str]:
    """The non-empty documents of a source (file, folder, glob or saved dataset), in order, streamed: memory
    holds one document (one record batch for Parquet), not the corpus. An empty corpus is an error at its end."""
    files = source_files(path)
    empty = True
    for file in files:
        for document in _file_documents(file, field):
            document = document.strip()
            if document:
                empty = False
                yield document
    if empty:
        raise EloError(f"corpus {path} is empty; give it some text")


def read_source(spec: str | Source) -> list[str]:
    """The documents of a source written `PATH[#FIELD][@WEIGHT]` (the weight is ignored here)."""
    source = Source.parse(spec)
    return read_documents(source.path, source.field)


def read_documents(path: str | Path, field: str = TEXT_FIELD) -> list[str]:
    """All non-empty documents of a source (file, folder, glob or saved dataset), in order."""
    return list(iter_documents(path, field))


def split_documents(documents: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """Split a corpus into a leading part and a trailing `holdout` fraction of its documents.

    Documents of the tail that also occur in the head are dropped, so the parts share no text even when the
    corpus repeats itself.
    """
    cut = len(documents) - max(1, round(len(documents) * holdout)) if holdout > 0 else len(documents)
    if cut <= 0:
        raise EloError(f"a corpus of {len(documents)} documents is too small to hold out {holdout:.0%} of it")
    head = documents[:cut]
    seen = set(head)
    return head, [d for d in documents[cut:] if d not in seen]


# ---------------------------------------------------------------- held-out text never in training


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _unit_hash(unit: str) -> int:
    return int.from_bytes(hashlib.blake2b(unit.encode(), digest_size=8).digest(), "little")


def _paragraph_units(text: str, min_chars: int) -> Iterator[list[str]]:
    """Per paragraph (blank-line separated): the whitespace-normalised paragraph and its lines, those of at
    least `min_chars` characters."""
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [_normalise(line) for line in paragraph.splitlines()]
        units = {" ".join(line for line in lines if line), *lines}
        yield [unit for unit in units if len(unit) >= min_chars]


def check_no_overlap(
    train_documents: Iterable[str],
    eval_text: str,
    *,
    name: str = "the evaluation text",
    on_overlap: str = "warn",
    min_chars: int = MIN_OVERLAP_CHARS,
) -> int:
    """How many paragraphs of the held-out `eval_text` also occur in the training documents; warn or stop if any.

    A held-out paragraph counts when it, or one of its lines, of at least `min_chars` characters, is a whole
    paragraph or line of a training document (whitespace collapsed, case kept). Memory holds 8-byte hashes of the
    held-out text only; the training documents are streamed once, so a generator over a large corpus is fine.
    `on_overlap`: "warn" (one line on stderr), "error" (EloError) or "ignore".
    """
    if on_overlap not in ("warn", "error", "ignore"):
        raise ValueError(f"on_overlap must be warn, error or ignore, not {on_overlap!r}")
    paragraphs = [units for units in _paragraph_units(eval_text, min_chars) if units]
    wanted = {_unit_hash(unit) for units in paragraphs for unit in units}
    found: set[int] = set()
    for document in train_documents:
        for units in _paragraph_units(document, min_chars):
            found.update(h for h in map(_unit_hash, units) if h in wanted)
    overlapping = [units for units in paragraphs if any(_unit_hash(unit) in found for unit in units)]
    if overlapping and on_overlap != "ignore":
        example = min(overlapping[0], key=len)
        message = (f"{name}: {len(overlapping)} of {len(paragraphs)} paragraphs also occur in the training data "
                   f"(e.g. {example[:60]!r}); held-out scores would be too good")
        if on_overlap == "error":
            raise EloError(message + "; remove them from one side")
        print(f"warning: {message}", file=sys.stderr)
    return len(overlapping)


# ---------------------------------------------------------------- mixing by byte share


def _take_bytes(documents: list[str], quota: int) -> tuple[list[str], bool]:
    """Leading documents holding `quota` UTF-8 bytes, the last one cut at a word boundary; False if too few."""
    taken, size = [], 0
    for document in documents:
        length = len(document.encode())
        if size + length >= quota:
            cut = document.encode()[: quota - size].decode("utf-8", errors="ignore")
            cut = cut[: cut.rfind(" ")] if " " in cut else cut
            if cut.strip():
                taken.append(cut.strip())
            return taken, True
        taken.append(document)
        size += length
    return taken, False


def mix_documents(
    corpora: list[list[str]], weights: list[float], tokenizer, n_tokens: int, names: list[str] | None = None
) -> list[tuple[int, str]]:
    """Take documents from each corpus so that their UTF-8 byte shares equal the weights and they make `n_tokens`.

    Weights are relative (normalised to sum to 1); each must be a positive number. Each corpus gives its leading
    documents up to its byte quota (the last one cut at a word boundary, so the shares are exact rather than off
    by one long document). The result, (corpus index, document) pairs, interleaves the corpora in proportion.
    Deterministic: shuffle the corpora beforehand if order matters.
    """
    names = names or [f"corpus {i + 1}" for i in range(len(corpora))]
    shares = check_weights(list(weights), names)

    def tokens_of(documents: list[str]) -> int:
        return sum(len(ids) + 1 for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]) if documents else 0

    # Tokens per byte of each corpus, from a sample, to turn the token budget into a byte budget.
    rates = []
    for corpus in corpora:
        sample, _ = _take_bytes(corpus, 200_000)
        rates.append(tokens_of(sample) / max(1, sum(len(d.encode()) for d in sample)))
    total_bytes = n_tokens / sum(share * rate for share, rate in zip(shares, rates))
    for _ in range(5):
        parts = []
        for which, corpus in enumerate(corpora):
            part, enough = _take_bytes(corpus, round(shares[which] * total_bytes))
            if not enough:
                raise EloError(
                    f"{names[which]} has too little text for {n_tokens:,} tokens at a {shares[which]:.0%} byte share; "
                    "lower the token budget or give it more text"
                )
            parts.append(part)
        made = sum(tokens_of(part) for part in parts)
        if made >= n_tokens:
            break
        total_bytes *= 1.02 * n_tokens / made
    else:
        raise EloError(f"could not reach {n_tokens:,} tokens from the given corpora")
    # Interleave: always continue the corpus furthest below its share of the bytes emitted so far.
    mixture: list[tuple[int, str]] = []
    cursor, emitted = [0] * len(parts), [0] * len(parts)
    while len(mixture) < sum(map(len, parts)):
        open_parts = [i for i in range(len(parts)) if cursor[i] < len(parts[i])]
        which = max(open_parts, key=lambda i: shares[i] * (sum(emitted) + 1) - emitted[i])
        document = parts[which][cursor[which]]
        cursor[which] += 1
        emitted[which] += len(document.encode())
        mixture.append((which, document))
    return mixture


def write_jsonl(path: Path, documents: list[str], extra: list[dict] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, document in enumerate(documents):
            f.write(json.dumps({TEXT_FIELD: document, **(extra[i] if extra else {})}, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- tokenizing and packing


def separator_id(tokenizer) -> int:
    """The token placed between packed documents."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise EloError("the tokenizer has no eos, bos or pad token to separate documents with")


def token_chunks(documents: Iterable[str], tokenizer, max_tokens: int | None = None,
                 batch: int | None = None) -> Iterator[np.ndarray]:
    """Token ids of the documents, each followed by the separator, one int64 array per batch of documents.

    The tokenizer is called once per `batch` documents (a fast tokenizer encodes a batch in parallel). Stops after
    the batch that reaches `max_tokens`.
    """
    sep = separator_id(tokenizer)
    batch = batch or TOKENIZE_BATCH
    documents = iter(documents)
    made = 0
    while max_tokens is None or made < max_tokens:
        docs = list(itertools.islice(documents, batch))
        if not docs:
            return
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        chunk = np.fromiter(itertools.chain.from_iterable(ids + [sep] for ids in encoded), dtype=np.int64,
                            count=sum(len(ids) + 1 for ids in encoded))
        made += len(chunk)
        yield chunk


def _too_small(tokens: int, seq_len: int, what: str) -> EloError:
    return EloError(f"{what} makes {tokens} tokens, less than one sequence of {seq_len}; give more text or lower seq_len")


def pack(documents: Iterable[str], tokenizer, seq_len: int, max_rows: int | None = None,
         what: str = "the training text") -> torch.Tensor:
    """Tokenize documents, join them with a separator token and cut into rows of `seq_len` (remainder dropped).

    With `max_rows`, tokenization stops as soon as that many rows are filled.
    """
    chunks = list(token_chunks(documents, tokenizer, None if max_rows is None else max_rows * seq_len))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    rows = len(ids) // seq_len if max_rows is None else min(max_rows, len(ids) // seq_len)
    if rows == 0:
        raise _too_small(len(ids), seq_len, what)
    return torch.from_numpy(ids[: rows * seq_len].copy()).view(rows, seq_len)


class PackedDataset(Dataset):
    """Rows of packed token ids, served as causal-LM examples (labels are the inputs; the model shifts them).

    `rows` is a tensor or a (memory-mapped) numpy array of shape (rows, seq_len); a row is read only when asked
    for. `order` (optional) maps example i to row order[i], so shuffling never copies the rows.
    """

    def __init__(self, rows, order: torch.Tensor | None = None):
        self.rows = rows
        self.order = None if order is None else torch.as_tensor(order, dtype=torch.long)

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[1])

    def shuffled(self, order) -> PackedDataset:
        """The same rows in `order` (a permutation of range(len(self)))."""
        order = torch.as_tensor(order, dtype=torch.long)
        return PackedDataset(self.rows, order if self.order is None else self.order[order])

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else int(self.rows.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.order is not None:
            index = int(self.order[index])
        row = self.rows[index]
        if isinstance(row, np.ndarray):
            row = torch.from_numpy(row.astype(np.int64))
        return {"input_ids": row, "labels": row}

    def __getstate__(self):  # a memory map travels to worker processes as its file, not as its contents
        state = dict(self.__dict__)
        if isinstance(self.rows, np.memmap) and self.rows.filename:
            state["rows"] = ("memmap", self.rows.filename, self.rows.dtype.str, self.rows.shape)
        return state

    def __setstate__(self, state):
        rows = state["rows"]
        if isinstance(rows, tuple) and rows and rows[0] == "memmap":
            _, filename, dtype, shape = rows
            state["rows"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=tuple(shape))
        self.__dict__.update(state)


# ---------------------------------------------------------------- the tokenized cache


def token_cache_dir() -> Path:
    """Where packed rows are cached: `$ELO_CPT_TOKEN_CACHE`, else `$ELO_CPT_CACHE/tokens`, else `~/.cache/elo-cpt/tokens`."""
    from elo_cpt.assets import cache_root

    if os.environ.get("ELO_CPT_TOKEN_CACHE"):
        return Path(os.environ["ELO_CPT_TOKEN_CACHE"]).expanduser()
    return cache_root() / "tokens"


def _glob_root(path: Path) -> Path:
    parts = []
    for part in path.parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def source_digest(source: Source | str) -> str:
    """sha256 over the content of a source's files (streamed), with each file's name relative to the source
    (for a single file: its suffix only, so the same file elsewhere has the same digest)."""
    source = Source.parse(source)
    path = source.path
    root = _glob_root(path) if any(ch in str(path) for ch in "*?[") else path
    digest = hashlib.sha256()
    for entry in source_files(path):
        files = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
        for file in files:
            name = file.suffix if file == path else file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
            digest.update(f"{name}\0{file.stat().st_size}\0".encode())
            try:
                with file.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
            except OSError as err:
                raise EloError(f"cannot read {file}: {err.strerror or err}") from None
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the token ids: the tokenizer's full definition (vocabulary, merges, normaliser,
    pre-tokenizer, added tokens) and the separator id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{separator_id(tokenizer)}\0{spec}".encode()).hexdigest()


def cache_key(sources: list[Source], tokenizer, seq_len: int, n_tokens: int | None) -> tuple[str, dict]:
    """The cache key of a packed dataset, and what it was computed from."""
    mixing = n_tokens is not None and len(sources) > 1
    shares = check_weights([s.weight for s in sources], [str(s.path) for s in sources]) if mixing else [None] * len(sources)
    inputs = {
        "version": CACHE_VERSION,
        "sources": [{"path": str(s.path), "content_sha256": source_digest(s), "field": s.field, "share": share}
                    for s, share in zip(sources, shares)],
        "tokenizer_sha256": tokenizer_digest(tokenizer),
        "seq_len": seq_len,
        "n_tokens": n_tokens,
    }
    keyed = {**inputs, "sources": [{k: v for k, v in s.items() if k != "path"} for s in inputs["sources"]]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:32], inputs


def _cached_rows(folder: Path, key: str, seq_len: int) -> np.memmap | None:
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


def _write_rows(chunks: Iterable[np.ndarray], folder: Path, key: str, seq_len: int, max_rows: int | None,
                dtype: np.dtype, meta: dict, what: str) -> np.memmap:
    """Append the chunks to a temporary file, cut it to whole rows, then publish it under the key: the .bin
    first, the .json (which marks the entry complete) last, each by an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    tmp = folder / f".{key}.{os.getpid()}.bin.tmp"
    limit = np.iinfo(dtype).max
    try:
        tokens = 0
        with tmp.open("wb") as f:
            for chunk in chunks:
                if len(chunk) and chunk.max() > limit:
                    raise EloError(f"token id {int(chunk.max())} does not fit the cache's {dtype.name}; report this")
                f.write(chunk.astype(dtype).tobytes())
                tokens += len(chunk)
            rows = tokens // seq_len if max_rows is None else min(max_rows, tokens // seq_len)
            if rows == 0:
                raise _too_small(tokens, seq_len, what)
            f.truncate(rows * seq_len * dtype.itemsize)
            f.flush()
            os.fsync(f.fileno())
        if max_rows is not None and rows < max_rows:
            raise EloError(
                f"{what} makes {rows * seq_len:,} tokens, fewer than the {max_rows * seq_len:,} asked for; "
                "lower the token budget or give more text"
            )
        os.replace(tmp, bin_path)
        meta_tmp = folder / f".{key}.{os.getpid()}.json.tmp"
        meta_tmp.write_text(json.dumps({**meta, "rows": rows, "seq_len": seq_len, "dtype": dtype.str,
                                        "tokens": rows * seq_len}, indent=1) + "\n")
        os.replace(meta_tmp, meta_path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(rows, seq_len))


def _resolve_cache(cache_dir) -> Path | None:
    if cache_dir is None or cache_dir is False:
        return None
    return token_cache_dir() if cache_dir is True else Path(cache_dir).expanduser()


def load_training_data(sources: list[str | Source], tokenizer, seq_len: int, n_tokens: int | None = None,
                       cache_dir: str | Path | bool | None = True) -> PackedDataset:
    """The packed dataset of a stage.

    One source: its documents in order, up to `n_tokens` (all of them if None), streamed. Several sources with a
    token budget: a mixture whose byte shares follow the weights (see `mix_documents`).

    The packed rows are cached, memory-mapped, in `cache_dir` (True: `token_cache_dir()`; None or False: no
    cache), keyed by the sources' content, fields and weights, the token budget, the tokenizer and `seq_len`: a
    second call with the same inputs reads the rows from disk and tokenizes nothing.
    """
    parsed = [Source.parse(s) for s in sources]
    if not parsed:
        raise EloError("no training data given; pass --data PATH (repeatable, PATH@WEIGHT to mix)")
    names = [str(s.path) for s in parsed]
    what = "the training text of " + ", ".join(names)
    mixing = n_tokens is not None and len(parsed) > 1
    if mixing:
        check_weights([s.weight for s in parsed], names)
    elif len({s.weight for s in parsed}) > 1:
        print("warning: data weights apply only with a token budget (--tokens); using every document once", file=sys.stderr)
    wanted = None if n_tokens is None else max(1, n_tokens // seq_len)
    folder = _resolve_cache(cache_dir)
    key = meta = None
    if folder is not None:
        key, meta = cache_key(parsed, tokenizer, seq_len, n_tokens)
        rows = _cached_rows(folder, key, seq_len)
        if rows is not None and (wanted is None or rows.shape[0] >= wanted):
            return PackedDataset(rows)
    if mixing:
        corpora = [read_source(s) for s in parsed]
        documents: Iterable[str] = [d for _, d in mix_documents(corpora, [s.weight for s in parsed], tokenizer, n_tokens, names)]
    else:
        documents = itertools.chain.from_iterable(iter_documents(s.path, s.field) for s in parsed)
    if folder is None:
        rows = pack(documents, tokenizer, seq_len, wanted, what=what)
        if wanted is not None and rows.shape[0] < wanted:
            raise EloError(
                f"{what} makes {rows.shape[0] * seq_len:,} tokens, fewer than the {n_tokens:,} asked for; "
                "lower the token budget or give more text"
            )
        return PackedDataset(rows)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)
    chunks = token_chunks(documents, tokenizer, None if wanted is None else wanted * seq_len)
    return PackedDataset(_write_rows(chunks, folder, key, seq_len, wanted, dtype, meta, what))
