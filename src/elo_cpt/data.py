"""Training text, from corpora to packed rows: disjoint splits, the held-out overlap check, mixing by byte share,
tokenizing and packing into fixed-length sequences.

Everything streams: a corpus is read as often as needed (see `corpus`), never held in memory, so corpora larger
than memory mix and pack in constant memory (a split keeps 8 bytes per document). A corpus is passed around as
a callable that opens a fresh stream of its documents.

Packed rows are cached on disk (see `tokencache`), so a re-run never tokenizes again.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from elo_cpt import corpus, files, tokencache
from elo_cpt.corpus import TEXT_FIELD, TOKENIZE_BATCH, Source
from elo_cpt.errors import EloError

#: Held-out paragraphs and lines shorter than this (after collapsing whitespace) are not checked for overlap.
MIN_OVERLAP_CHARS = 40
#: A corpus: a callable that opens a fresh stream of its documents, in the same order each time.
Documents = Callable[[], Iterable[str]]


# ---------------------------------------------------------------- disjoint splits


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_stream(documents: Documents, holdout: float, name: str = "a corpus") -> tuple[Documents, Documents]:
    """Split a corpus into a leading part and a trailing `holdout` fraction of its documents, as two corpora.

    Documents of the tail that also occur in the head are dropped, so the parts share no text even when the corpus
    repeats itself. One pass reads the corpus to count and hash its documents; memory holds 8 bytes per document.
    `name` names the corpus in the error a corpus too small to split gets.
    """
    hashes = np.fromiter((_hash(d) for d in documents()), dtype=np.uint64)
    cut = len(hashes) - max(1, round(len(hashes) * holdout)) if holdout > 0 else len(hashes)
    if cut <= 0:
        count = f"{len(hashes)} document{'s' if len(hashes) != 1 else ''}"
        raise EloError(f"{name} holds {count}, too few to hold out {holdout:.0%} of them for the alignment; give it more "
                       "documents (a .txt file splits into documents at blank lines)")
    repeated = np.isin(hashes[cut:], hashes[:cut])

    def head() -> Iterator[str]:
        return itertools.islice(documents(), cut)

    def tail() -> Iterator[str]:
        return (d for d, seen in zip(itertools.islice(documents(), cut, None), repeated) if not seen)

    return head, tail


def split_documents(documents: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """`split_stream` of a list: the leading part and the trailing `holdout` fraction, sharing no document."""
    head, tail = split_stream(lambda: iter(documents), holdout)
    return list(head()), list(tail())


# ---------------------------------------------------------------- held-out text never in training


def _normalise(text: str) -> str:
    return " ".join(text.split())


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
    wanted = {_hash(unit) for units in paragraphs for unit in units}
    found: set[int] = set()
    for document in train_documents:
        for units in _paragraph_units(document, min_chars):
            found.update(h for h in map(_hash, units) if h in wanted)
    overlapping = [units for units in paragraphs if any(_hash(unit) in found for unit in units)]
    if overlapping and on_overlap != "ignore":
        example = min(overlapping[0], key=len)
        message = (f"{name}: {len(overlapping)} of {len(paragraphs)} paragraphs also occur in the training data "
                   f"(e.g. {example[:60]!r}); held-out scores would be too good")
        if on_overlap == "error":
            raise EloError(message + "; remove them from one side")
        print(f"warning: {message}", file=sys.stderr)
    return len(overlapping)


# ---------------------------------------------------------------- mixing by byte share


class _TooLittle(Exception):
    """A corpus ended before its byte quota."""


def _leading_bytes(documents: Iterable[str], quota: int) -> Iterator[str]:
    """Leading documents holding `quota` UTF-8 bytes, the last one cut at a word boundary; _TooLittle at the end
    if the corpus holds fewer."""
    size = 0
    for document in documents:
        encoded = document.encode()
        if size + len(encoded) >= quota:
            cut = encoded[: quota - size].decode("utf-8", errors="ignore")
            cut = cut[: cut.rfind(" ")] if " " in cut else cut
            if cut.strip():
                yield cut.strip()
            return
        yield document
        size += len(encoded)
    raise _TooLittle


def _count_tokens(documents: Iterable[str], tokenizer) -> int:
    """Tokens of the documents, a separator each, counted a batch at a time."""
    documents, total = iter(documents), 0
    while batch := list(itertools.islice(documents, TOKENIZE_BATCH)):
        total += sum(len(ids) + 1 for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total


def tokens_per_char(documents: Iterable[str], tokenizer) -> float:
    """Tokens per character of the documents as a stage packs them (a separator after each): a stage's training
    tokens divided by it are the characters of text it trained on, whatever the tokenizer."""
    documents, tokens, chars = iter(documents), 0, 0
    while batch := list(itertools.islice(documents, TOKENIZE_BATCH)):
        tokens, chars = tokens + _count_tokens(batch, tokenizer), chars + sum(map(len, batch))
    return tokens / max(1, chars)


def _sample(documents: Documents, quota: int) -> list[str]:
    taken = []
    try:
        taken.extend(_leading_bytes(documents(), quota))
    except _TooLittle:
        pass
    return taken


def _token_rates(corpora: list[Documents], tokenizer) -> list[float]:
    """Tokens per UTF-8 byte of each corpus, from its leading 200 KB, to turn token budgets into byte budgets."""
    rates = []
    for documents in corpora:
        sample = _sample(documents, 200_000)
        rates.append(_count_tokens(sample, tokenizer) / max(1, sum(len(d.encode()) for d in sample)))
    return rates


def one_pass_tokens(corpora: list[Documents], weights: list[float], tokenizer, names: list[str] | None = None,
                    margin: float = 0.95) -> int:
    """The largest token budget `mix_stream` can take from the corpora at these byte shares: one pass over the corpus
    that runs out first. The corpora are read once to size them; their token rates are estimated from their
    leading 200 KB, hence the `margin` kept below the estimate."""
    names = names or [f"corpus {i + 1}" for i in range(len(corpora))]
    shares = corpus.check_weights(list(weights), names)
    sizes = [sum(len(d.encode()) for d in documents()) for documents in corpora]
    total_bytes = min(size / share for size, share in zip(sizes, shares))
    rates = _token_rates(corpora, tokenizer)
    return int(margin * total_bytes * sum(share * rate for share, rate in zip(shares, rates)))


def mix_stream(
    corpora: list[Documents], weights: list[float], tokenizer, n_tokens: int, names: list[str] | None = None
) -> Iterator[tuple[int, str]]:
    """Take documents from each corpus so that their UTF-8 byte shares equal the weights and they make `n_tokens`.

    Weights are relative (normalised to sum to 1); each must be a positive number. Each corpus gives its leading
    documents up to its byte quota (the last one cut at a word boundary, so the shares are exact rather than off by
    one long document). Returns (corpus index, document) pairs that interleave the corpora in proportion, streamed:
    the quotas are found (and errors raised) before this returns, by reading and tokenizing each corpus's lead
    without keeping it. Deterministic: shuffle the corpora beforehand if order matters.
    """
    names = names or [f"corpus {i + 1}" for i in range(len(corpora))]
    shares = corpus.check_weights(list(weights), names)
    rates = _token_rates(corpora, tokenizer)
    total_bytes = n_tokens / sum(share * rate for share, rate in zip(shares, rates))
    for _ in range(5):
        quotas = [round(share * total_bytes) for share in shares]
        made = 0
        for which, (documents, quota) in enumerate(zip(corpora, quotas)):
            try:
                made += _count_tokens(_leading_bytes(documents(), quota), tokenizer)
            except _TooLittle:
                raise EloError(
                    f"{names[which]} has too little text for {n_tokens:,} tokens at a {shares[which]:.0%} byte share; "
                    "lower the token budget or give it more text"
                ) from None
        if made >= n_tokens:
            break
        total_bytes *= 1.02 * n_tokens / made
    else:
        raise EloError(f"could not reach {n_tokens:,} tokens from the given corpora")
    return _interleave([_leading_bytes(documents(), quota) for documents, quota in zip(corpora, quotas)], shares)


def _interleave(parts: list[Iterator[str]], shares: list[float]) -> Iterator[tuple[int, str]]:
    """Always continue the part furthest below its share of the bytes emitted so far."""
    done = object()
    heads = [next(part, done) for part in parts]
    emitted = [0] * len(parts)
    while open_parts := [i for i, head in enumerate(heads) if head is not done]:
        which = max(open_parts, key=lambda i: shares[i] * (sum(emitted) + 1) - emitted[i])
        document = heads[which]
        heads[which] = next(parts[which], done)
        emitted[which] += len(document.encode())
        yield which, document


def mix_documents(
    corpora: list[list[str]], weights: list[float], tokenizer, n_tokens: int, names: list[str] | None = None
) -> list[tuple[int, str]]:
    """`mix_stream` of corpora given as lists, as a list."""
    return list(mix_stream([functools.partial(iter, c) for c in corpora], weights, tokenizer, n_tokens, names))


def write_jsonl(path: Path, records: Iterable[str | dict]) -> int:
    """Write documents (or dicts holding a `text` field and more) as JSON lines, atomically; return how many."""
    count = 0
    with files.replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({TEXT_FIELD: record} if isinstance(record, str) else record, ensure_ascii=False) + "\n")
            count += 1
    return count


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


def pack(documents: Iterable[str], tokenizer, seq_len: int, max_rows: int | None = None,
         what: str = "the training text") -> torch.Tensor:
    """Tokenize documents, join them with a separator token and cut into rows of `seq_len` (remainder dropped).

    With `max_rows`, tokenization stops as soon as that many rows are filled.
    """
    chunks = list(token_chunks(documents, tokenizer, None if max_rows is None else max_rows * seq_len))
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    rows = len(ids) // seq_len if max_rows is None else min(max_rows, len(ids) // seq_len)
    if rows == 0:
        raise tokencache.too_small(len(ids), seq_len, what)
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

    def tokens_of(self, examples: int) -> int:
        """The tokens of the first `examples` rows (every row is full), as the engine counts trained tokens."""
        return examples * self.seq_len

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


# ---------------------------------------------------------------- loading a stage's data


def load_training_data(sources: list[str | Source], tokenizer, seq_len: int, n_tokens: int | None = None,
                       cache_dir: str | Path | bool | None = True) -> PackedDataset:
    """The packed dataset of a stage.

    One source: its documents in order, up to `n_tokens` (all of them if None), streamed. Several sources with a
    token budget: a mixture whose byte shares follow the weights (see `mix_stream`).

    The packed rows are cached, memory-mapped, in `cache_dir` (True: `tokencache.token_cache_dir()`; None or False: no
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
        corpus.check_weights([s.weight for s in parsed], names)
    elif len({s.weight for s in parsed}) > 1:
        print("warning: data weights apply only with a token budget (--tokens); using every document once", file=sys.stderr)
    wanted = None if n_tokens is None else max(1, n_tokens // seq_len)
    folder = tokencache.resolve_cache(cache_dir)
    key = meta = None
    if folder is not None:
        key, meta = tokencache.cache_key(parsed, tokenizer, separator_id(tokenizer), seq_len, n_tokens)
        rows = tokencache.cached_rows(folder, key, seq_len)
        if rows is not None and (wanted is None or rows.shape[0] >= wanted):
            return PackedDataset(rows)
    if mixing:
        corpora = [functools.partial(corpus.source_documents, s) for s in parsed]
        documents: Iterable[str] = (d for _, d in mix_stream(corpora, [s.weight for s in parsed], tokenizer, n_tokens, names))
    else:
        documents = itertools.chain.from_iterable(corpus.source_documents(s) for s in parsed)
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
    return PackedDataset(tokencache.write_rows(chunks, folder, key, seq_len, wanted, dtype, meta, what))
