"""Where training text comes from: corpus sources, read one document at a time.

A source is a file, a folder (every .txt, .jsonl and .parquet file under it, in name order), a glob, a Hugging
Face dataset folder written by `Dataset.save_to_disk`, or a dataset loaded by `datasets.load_dataset`:

    .txt       documents separated by blank lines
    .jsonl     one JSON object per line; the document is its `text` field (or another: PATH#FIELD)
    .parquet   one document per row, in the `text` column (or PATH#FIELD)
    dataset    a `save_to_disk` folder; the `text` column (or PATH#FIELD)
    hf:NAME[:CONFIG[:SPLIT]]
               a hub dataset (online) or a local data folder, streamed by `datasets.load_dataset(...,
               streaming=True)`; split `train` unless given; the `text` column (or hf:NAME#FIELD)

Sources are written `SOURCE[#FIELD][@WEIGHT]`; weights are relative shares of UTF-8 bytes (normalised to sum to
1), as in the paper. Every reader streams: memory holds one document (one record batch for Parquet and
datasets), never the corpus. Why files are read here rather than by `datasets.load_dataset`: docs/design.md.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elo_cpt.errors import EloError, first_line

TEXT_FIELD = "text"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
#: Documents per record batch read from Parquet files and datasets (and per tokenizer call, see `data`).
TOKENIZE_BATCH = 1000
#: The prefix of a source read by `datasets.load_dataset`.
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Source:
    """One corpus, the field its documents are in, and its share of the mixture."""

    path: Path
    weight: float = 1.0
    field: str = TEXT_FIELD

    @property
    def hub(self) -> bool:
        """Whether the source is read by `datasets.load_dataset` (written hf:NAME[:CONFIG[:SPLIT]])."""
        return is_hub(self.path)

    @classmethod
    def parse(cls, spec: str | Source) -> Source:
        """Parse `SOURCE[#FIELD][@WEIGHT]`."""
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


def is_hub(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def hub_parts(path: str | Path) -> tuple[str, str | None, str]:
    """(name, config, split) of a source written hf:NAME[:CONFIG[:SPLIT]]."""
    name, config, split = (str(path)[len(HUB_PREFIX):].split(":") + ["", ""])[:3]
    if not name:
        raise EloError(f"bad data source {str(path)!r}: write hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikimedia/wikipedia:20231101.ko")
    return name, config or None, split or "train"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _kinds(suffixes: tuple[str, ...]) -> str:
    return ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]


def source_files(path: str | Path, suffixes: tuple[str, ...] = FILE_SUFFIXES) -> list[Path]:
    """The files (or saved dataset folders) a source names, in a stable order; a folder or glob contributes its files
    ending in one of `suffixes` (chat data reads other formats than text corpora)."""
    if is_hub(path):
        raise EloError(f"{path} is read by datasets.load_dataset, not file by file")
    path = Path(path)
    if any(ch in str(path) for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in found if p.suffix in suffixes and p.is_file() or _is_saved_dataset(p)]
        if not files:
            raise EloError(f"no {_kinds(suffixes)} file matches {path}; check the pattern")
        return files
    if _is_saved_dataset(path) or path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise EloError(f"folder {path} holds no {_kinds(suffixes)} file")
        return files
    raise EloError(f"corpus {path} does not exist; check the path")


# ---------------------------------------------------------------- reading, one document at a time


#: A text file is refused when this share of its characters are invalid UTF-8 or control bytes other than
#: whitespace: a few bad bytes (Latin-1 umlauts: about 2% of German text) are replaced with a warning, a binary
#: file (random bytes: over half) stops, as soon as _EARLY_CHARS characters have been read.
NOT_TEXT_SHARE = 0.25
_EARLY_CHARS, _EARLY_SHARE = 4096, NOT_TEXT_SHARE
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a text file, streamed; invalid UTF-8 is replaced, with a warning
    at the end saying how much, and a file that is mostly not text (see NOT_TEXT_SHARE) is refused."""
    replaced = bad = chars = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    replaced += line.count("\ufffd") - raw.count("\ufffd".encode())
                bad += len(_CONTROL.findall(line))
                chars += len(line)
                if chars >= _EARLY_CHARS:
                    _check_text(path, replaced + bad, chars, _EARLY_SHARE)
                yield number, line
    except OSError as err:
        raise EloError(f"cannot read {path}: {err.strerror or err}") from None
    _check_text(path, replaced + bad, chars)
    if replaced:
        print(f"warning: {path}: {replaced} invalid UTF-8 byte sequence(s) replaced with U+FFFD", file=sys.stderr)


def _check_text(path: Path, bad: int, chars: int, share: float = NOT_TEXT_SHARE) -> None:
    if bad > share * chars:
        raise EloError(f"{path} is not text: {bad:,} of {chars:,} characters read are invalid UTF-8 or control "
                       "bytes; pass a UTF-8 text file")


def read_text(path: Path) -> str:
    """A whole text file, decoded as `text_lines` does (a few invalid bytes replaced, a binary file refused)."""
    text = "".join(line for _, line in text_lines(Path(path)))
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Path.read_text reads


def _txt_documents(path: Path) -> Iterator[str]:
    """Blocks of a text file separated by blank (or whitespace-only) lines."""
    lines: list[str] = []
    for _, line in text_lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for number, line in text_lines(path):
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
        reason = first_line(err)
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


def _hub_documents(path: str | Path, field: str) -> Iterator[str]:
    """Rows of one column of `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`, a batch at a time."""
    import datasets

    name, config, split = hub_parts(path)

    def unusable(err: Exception) -> EloError:
        reason = first_line(err)
        hint = ("; hub datasets need the network: unset HF_HUB_OFFLINE, or save the dataset with save_to_disk on "
                "a machine that is online and point at that folder" if "offline" in reason.lower() else "")
        return EloError(f"cannot read dataset {path}: {reason}{hint}")

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        batches = stream.iter(batch_size=TOKENIZE_BATCH)
        for batch in batches:
            if field not in batch:
                raise _no_column(Path(str(path)), field, list(batch))
            yield from (value for value in batch[field] if isinstance(value, str))
    except EloError:
        raise
    except Exception as err:  # datasets raises many types: missing dataset, bad split, network, parse errors
        raise unusable(err) from None


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, field)
    if path.suffix == ".parquet":
        return _parquet_documents(path, field)
    if _is_saved_dataset(path):
        return _dataset_documents(path, field)
    return _txt_documents(path)


def iter_documents(path: str | Path, field: str = TEXT_FIELD) -> Iterator[str]:
    """The non-empty documents of a source (file, folder, glob, saved dataset or hf: dataset), in order, streamed:
    memory holds one document (one record batch for Parquet and datasets), not the corpus. An empty corpus is an
    error at its end."""
    readers = [_hub_documents(path, field)] if is_hub(path) else [_file_documents(f, field) for f in source_files(path)]
    empty = True
    for reader in readers:
        for document in reader:
            document = document.strip()
            if document:
                empty = False
                yield document
    if empty:
        raise EloError(f"corpus {path} is empty; give it some text")


def source_documents(spec: str | Source) -> Iterator[str]:
    """The documents of a source written `SOURCE[#FIELD][@WEIGHT]` (the weight is ignored here), streamed."""
    source = Source.parse(spec)
    return iter_documents(source.path, source.field)


def read_source(spec: str | Source) -> list[str]:
    """The documents of a source written `SOURCE[#FIELD][@WEIGHT]`, as a list (small corpora only)."""
    return list(source_documents(spec))


def read_documents(path: str | Path, field: str = TEXT_FIELD) -> list[str]:
    """All non-empty documents of a source (file, folder, glob, saved dataset or hf: dataset), in order."""
    return list(iter_documents(path, field))


# ---------------------------------------------------------------- content digest (for the token cache)


def _glob_root(path: Path) -> Path:
    parts = []
    for part in path.parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _digest_file(digest, file: Path, name: str) -> None:
    digest.update(f"{name}\0{file.stat().st_size}\0".encode())
    try:
        with file.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as err:
        raise EloError(f"cannot read {file}: {err.strerror or err}") from None


def _hub_digest(path: Path) -> str:
    """A local data folder: its files' content; a hub dataset: its name and the commit it resolves to now."""
    name, config, split = hub_parts(path)
    digest = hashlib.sha256(f"{HUB_PREFIX}\0{config}\0{split}\0".encode())
    folder = Path(name)
    if folder.is_dir():
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            relative = file.relative_to(folder).as_posix()
            if not any(part.startswith(".") for part in relative.split("/")):
                _digest_file(digest, file, relative)
        return digest.hexdigest()
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(name).sha
    except Exception as err:  # offline, unknown, gated: the same causes that stop reading it
        reason = first_line(err)
        raise EloError(f"cannot resolve dataset {path} on the Hugging Face hub: {reason}; hub datasets need the "
                       "network (or save_to_disk the dataset and point at that folder)") from None
    digest.update(f"{name}\0{revision}".encode())
    return digest.hexdigest()


def source_digest(source: Source | str) -> str:
    """sha256 over the content of a source's files (streamed), with each file's name relative to the source
    (for a single file: its suffix only, so the same file elsewhere has the same digest). A hub dataset is known by
    its name and current commit."""
    source = Source.parse(source)
    path = source.path
    if source.hub:
        return _hub_digest(path)
    root = _glob_root(path) if any(ch in str(path) for ch in "*?[") else path
    digest = hashlib.sha256()
    for entry in source_files(path):
        files = sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry]
        for file in files:
            _digest_file(digest, file, file.suffix if file == path else file.relative_to(root).as_posix()
                         if file.is_relative_to(root) else str(file))
    return digest.hexdigest()
