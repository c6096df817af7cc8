"""Training text: read corpora, mix sources by byte share, tokenize and pack into fixed-length sequences.

A corpus is a `.jsonl` file (one document per line, in the field `text`) or a `.txt` file (documents separated
by blank lines). Sources are written `PATH` or `PATH@WEIGHT`; weights are shares of UTF-8 bytes, as in the paper.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from elo_cpt.errors import EloError

TEXT_FIELD = "text"


@dataclass(frozen=True)
class Source:
    """One corpus and its share of the mixture."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str | Source) -> Source:
        """Parse `PATH` or `PATH@WEIGHT`."""
        if isinstance(spec, Source):
            return spec
        path, _, weight = str(spec).rpartition("@") if "@" in str(spec) else (str(spec), "", "1")
        try:
            value = float(weight)
        except ValueError:
            raise EloError(f"bad data source {spec!r}: the weight after @ must be a number, e.g. corpus.jsonl@0.9") from None
        if value <= 0:
            raise EloError(f"bad data source {spec!r}: the weight must be positive")
        return cls(Path(path), value)


def read_documents(path: str | Path) -> list[str]:
    """All non-empty documents of a corpus file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise EloError(f"corpus {path} does not exist; check the path")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EloError(f"corpus {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise EloError(f"{path}:{number} is not valid JSON; each line must be an object with a {TEXT_FIELD!r} field") from None
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                raise EloError(f"{path}:{number} has no string field {TEXT_FIELD!r}")
            documents.append(record[TEXT_FIELD])
    else:
        documents = re.split(r"\n\s*\n", raw)
    documents = [d.strip() for d in documents if d.strip()]
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


def mix_documents(
    corpora: list[list[str]], weights: list[float], tokenizer, n_tokens: int, names: list[str] | None = None
) -> list[tuple[int, str]]:
    """Interleave documents so that each corpus's share of bytes tracks its weight, until `n_tokens` are reached.

    Returns (corpus index, document) pairs. Deterministic: corpora are read in order, so shuffle them beforehand.
    """
    shares = [w / sum(weights) for w in weights]
    taken_bytes = [0] * len(corpora)
    cursor = [0] * len(corpora)
    mixture: list[tuple[int, str]] = []
    tokens = 0
    while tokens < n_tokens:
        total = sum(taken_bytes)
        which = max(range(len(corpora)), key=lambda i: shares[i] * (total + 1) - taken_bytes[i])
        if cursor[which] >= len(corpora[which]):
            raise EloError(
                f"corpus {names[which] if names else which + 1} ran out of text after {tokens} of the {n_tokens} tokens asked for; "
                "lower the token budget or give it more text"
            )
        document = corpora[which][cursor[which]]
        cursor[which] += 1
        taken_bytes[which] += len(document.encode())
        tokens += len(tokenizer(document, add_special_tokens=False)["input_ids"]) + 1
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


def pack(documents: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize documents, join them with a separator token and cut into rows of `seq_len` (remainder dropped)."""
    ids: list[int] = []
    sep = separator_id(tokenizer)
    for start in range(0, len(documents), 256):
        for row in tokenizer(documents[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(sep)
    rows = len(ids) // seq_len
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
    """The packed dataset for a stage: every document of the sources once, or a byte-weighted mix of `n_tokens`."""
    parsed = [Source.parse(s) for s in sources]
    if not parsed:
        raise EloError("no training data given; pass --data PATH (repeatable, PATH@WEIGHT to mix)")
    corpora = [read_documents(s.path) for s in parsed]
    if n_tokens is None:
        documents = [d for corpus in corpora for d in corpus]
    else:
        names = [str(s.path) for s in parsed]
        documents = [d for _, d in mix_documents(corpora, [s.weight for s in parsed], tokenizer, n_tokens, names)]
    rows = pack(documents, tokenizer, seq_len)
    if n_tokens is not None:
        rows = rows[: max(1, n_tokens // seq_len)]
    return PackedDataset(rows)
