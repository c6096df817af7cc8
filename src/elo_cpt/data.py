"""Training text: read corpora, mix sources by byte share, tokenize and pack into fixed-length sequences.

A source is a file, a folder (every .txt, .jsonl and .parquet file under it, in name order), a glob, or a
Hugging Face dataset folder written by `Dataset.save_to_disk`:

    .txt       documents separated by blank lines
    .jsonl     one JSON object per line; the document is its `text` field (or another: PATH#FIELD)
    .parquet   one document per row, in the `text` column (or PATH#FIELD)
    dataset    a `save_to_disk` folder; the `text` column (or PATH#FIELD)

Sources are written `PATH[#FIELD][@WEIGHT]`; weights are shares of UTF-8 bytes, as in the paper.
"""

from __future__ import annotations

import glob
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from elo_cpt.errors import EloError

TEXT_FIELD = "text"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


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
        if value <= 0:
            raise EloError(f"bad data source {spec!r}: the weight must be positive")
        return cls(Path(path), value, field or TEXT_FIELD)


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


def _read_text(path: Path) -> str:
    """The file as text; invalid UTF-8 is replaced (with a warning saying how much), not fatal."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        print(f"warning: {path}: {replaced} invalid UTF-8 byte sequence(s) replaced with U+FFFD", file=sys.stderr)
        return text


def _column(path: Path, field: str) -> list:
    """One column of a Parquet file or a saved Hugging Face dataset."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for damaged files
            raise EloError(f"cannot read Parquet file {path}: {str(err).splitlines()[0]}") from None
        names = table.column_names
        values = lambda: table.column(field).to_pylist()  # noqa: E731
    else:
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise EloError(f"{path} holds several splits ({', '.join(dataset)}); point at one split's folder")
        names = dataset.column_names
        values = lambda: dataset[field]  # noqa: E731
    if field not in names:
        raise EloError(f"{path} has no column {field!r} (it has {', '.join(names)}); name it with PATH#COLUMN")
    return values()


def _file_documents(path: Path, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise EloError(f"{path}:{number} is not valid JSON; each line must be an object with a {field!r} field") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise EloError(f"{path}:{number} has no string field {field!r}; name the field with PATH#FIELD")
            documents.append(record[field])
        return documents
    if path.suffix == ".parquet" or _is_saved_dataset(path):
        return [value for value in _column(path, field) if isinstance(value, str)]
    return re.split(r"\n\s*\n", _read_text(path))


def read_source(spec: str | Source) -> list[str]:
    """The documents of a source written `PATH[#FIELD][@WEIGHT]` (the weight is ignored here)."""
    source = Source.parse(spec)
    return read_documents(source.path, source.field)


def read_documents(path: str | Path, field: str = TEXT_FIELD) -> list[str]:
    """All non-empty documents of a source (file, folder, glob or saved dataset), in order."""
    documents = [d.strip() for file in source_files(path) for d in _file_documents(file, field)]
    documents = [d for d in documents if d]
    if not documents:
        raise EloError(f"corpus {path} is empty; give it some text")
    return documents


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

    Each corpus gives its leading documents up to its byte quota (the last one cut at a word boundary, so the
    shares are exact rather than off by one long document). The result, (corpus index, document) pairs,
    interleaves the corpora in proportion. Deterministic: shuffle the corpora beforehand if order matters.
    """
    shares = [w / sum(weights) for w in weights]
    names = names or [f"corpus {i + 1}" for i in range(len(corpora))]

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


def separator_id(tokenizer) -> int:
    """The token placed between packed documents."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return int(token_id)
    raise EloError("the tokenizer has no eos, bos or pad token to separate documents with")


def pack(documents: list[str], tokenizer, seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with a separator token and cut into rows of `seq_len` (remainder dropped).

    With `max_rows`, tokenization stops as soon as that many rows are filled.
    """
    ids: list[int] = []
    sep = separator_id(tokenizer)
    for start in range(0, len(documents), 256):
        for row in tokenizer(documents[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(sep)
        if max_rows is not None and len(ids) >= max_rows * seq_len:
            break
    rows = len(ids) // seq_len if max_rows is None else min(max_rows, len(ids) // seq_len)
    if rows == 0:
        raise EloError(f"the training text makes {len(ids)} tokens, less than one sequence of {seq_len}; give more text or lower seq_len")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


class PackedDataset(Dataset):
    """Rows of packed token ids, served as causal-LM examples (labels are the inputs; the model shifts them)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row}


def load_training_data(sources: list[str | Source], tokenizer, seq_len: int, n_tokens: int | None = None) -> PackedDataset:
    """The packed dataset of a stage.

    One source: its documents in order, up to `n_tokens` (all of them if None). Several sources with a token
    budget: a mixture whose byte shares follow the weights (see `mix_documents`).
    """
    parsed = [Source.parse(s) for s in sources]
    if not parsed:
        raise EloError("no training data given; pass --data PATH (repeatable, PATH@WEIGHT to mix)")
    corpora = [read_source(s) for s in parsed]
    if n_tokens is None or len(parsed) == 1:
        documents = [d for corpus in corpora for d in corpus]
    else:
        names = [str(s.path) for s in parsed]
        documents = [d for _, d in mix_documents(corpora, [s.weight for s in parsed], tokenizer, n_tokens, names)]
    wanted = None if n_tokens is None else max(1, n_tokens // seq_len)
    rows = pack(documents, tokenizer, seq_len, wanted)
    if wanted is not None and rows.shape[0] < wanted:
        raise EloError(
            f"the training data makes {rows.shape[0] * seq_len:,} tokens, fewer than the {n_tokens:,} asked for; "
            "lower the token budget or give more text"
        )
    return PackedDataset(rows)
