"""Vocabulary extension for a target language (`elo vocab`): new tokens learned from its text, appended to the
model's byte-level BPE tokenizer, and embedding rows for them.

Why continued BPE training rather than a second tokenizer merged in: the target corpus is pre-tokenized with the
model's own pre-tokenizer, every word is segmented by the model's own BPE, and new merges are learned on top of
those segmentations (the most frequent adjacent pair, again and again). Each new merge is appended at the end of
the tokenizer's merge list, so it applies only after every old merge has been applied: an old encoding changes
only where a new merge fires. A new merge must produce a token with at least one non-ASCII byte, so text made of
ASCII bytes alone (English, code) keeps its exact token ids; by default a new token holds no ASCII byte at all,
so every ASCII character of any text is still encoded by the same tokens as before (`ascii_context=True` lets a
new token hold a leading space or punctuation next to non-ASCII bytes: fewer tokens, but words that mix ASCII
and non-ASCII characters may then be split differently). Method, guarantees and measurements: docs/vocab.md.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from elo_cpt import checkpoint, corpus, files
from elo_cpt.errors import EloError

VOCAB_FILE = "elo_vocab.json"
#: A pair seen fewer times than this in the corpus is no pattern worth a token.
MIN_PAIR_COUNT = 2

_log = logging.getLogger(__name__).info


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte -> the byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(shown)
    extra = 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(shown, chars, strict=True)}


BYTE_OF = _byte_of()


def _is_byte_level(spec: dict | None) -> bool:
    if not spec:
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return spec.get("type") == "Sequence" and any(_is_byte_level(p) for p in spec.get("pretokenizers", []))


def _tokenizer_json(tokenizer, name: str) -> dict:
    """The tokenizer's JSON, refused unless it is a byte-level BPE (the only kind supported)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    kind = model.get("type") or type(tokenizer).__name__
    if (model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")) or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("byte_fallback")):
        raise EloError(f"{name} has a {kind} tokenizer without a byte-level pre-tokenizer; elo vocab supports only "
                       "byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen, Mistral Nemo style)")
    return spec


def _ascii_free(token: str, ascii_context: bool) -> bool:
    """Whether a token may be new: no ASCII byte (default), or with `ascii_context` at least one non-ASCII byte."""
    high = [BYTE_OF.get(c, 0) >= 128 for c in token]
    return any(high) if ascii_context else all(high)


def count_words(tokenizer, documents: Iterable[str]) -> tuple[Counter[str], int]:
    """The corpus's pre-tokenized words (the model's own normalizer and pre-tokenizer) with their counts, and its
    characters."""
    backend = tokenizer.backend_tokenizer
    words: Counter[str] = Counter()
    chars = 0
    for doc in documents:
        chars += len(doc)
        text = backend.normalizer.normalize_str(doc) if backend.normalizer is not None else doc
        words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return words, chars


def learn_merges(words: dict[tuple[str, ...], int], add: int, known: set[str], ascii_context: bool = False) -> list[tuple[str, str]]:
    """Up to `add` merges learned on words already segmented by the old BPE: the most frequent adjacent pair (at
    least MIN_PAIR_COUNT times; ties broken by the pair's text) whose token is allowed and not in `known`.

    Incremental: pair counts and the words each pair occurs in are kept, and a merge rewrites only those words; a
    heap with lazily refreshed entries finds the most frequent pair."""
    seqs = [list(word) for word in words]
    freqs = list(words.values())
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    banned: set[tuple[str, str]] = set()
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < add:
        negative, pair = heapq.heappop(heap)
        now = counts.get(pair, 0)
        if pair in banned or now < MIN_PAIR_COUNT:
            continue
        if now != -negative:
            if now < -negative:
                heapq.heappush(heap, (-now, pair))  # a larger count was pushed when it grew; a smaller one was not
            continue
        token = pair[0] + pair[1]
        if token in known or not _ascii_free(token, ascii_context):
            banned.add(pair)
            continue
        merges.append(pair)
        known.add(token)
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            seq, freq = seqs[i], freqs[i]
            for old in zip(seq, seq[1:]):
                counts[old] -= freq
                changed.add(old)
            merged, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == pair[0] and seq[j + 1] == pair[1]:
                    merged.append(token)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            seqs[i] = merged
            for new in zip(merged, merged[1:]):
                counts[new] += freq
                where.setdefault(new, set()).add(i)
                changed.add(new)
        counts.pop(pair, None)
        for other in changed - {pair}:
            n = counts.get(other, 0)
            if n >= MIN_PAIR_COUNT and other not in banned:
                heapq.heappush(heap, (-n, other))
    return merges


def _documents(sources: list[str]) -> Iterator[str]:
    """The documents of every source in turn, streamed (the corpus is read twice, never held whole)."""
    for source in sources:
        yield from corpus.source_documents(source)


def _tokens_per_char(tokenizer, sources: list[str], chars: int) -> float:
    """Tokens per character of the corpus (each document encoded alone, without special tokens)."""
    total = 0
    documents = _documents(sources)
    while batch := list(itertools.islice(documents, corpus.TOKENIZE_BATCH)):
        total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total / max(chars, 1)


def _input_rows(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def extend_vocabulary(model: str | Path, sources: list[str] | str, add: int, out: str | Path, *,
                      ascii_context: bool = False, overwrite: bool = False) -> dict:
    """Learn `add` new tokens from `sources` (corpus specs, docs/data.md), append them to MODEL's byte-level BPE,
    resize its embedding (and an untied head), and write the extended model to `out` atomically.

    Each new row starts as the mean of the rows of the old tokens that spelled the new token (its encoding by the
    old BPE): the model then reads a new token roughly as it read its pieces, instead of as noise. Old rows, the
    config's padding rows included, stay byte-identical; new ids start after both the tokenizer and the embedding.
    Returns the summary also written to `out`/elo_vocab.json."""
    if not isinstance(add, int) or add < 1:
        raise EloError(f"--add must be a positive number of new tokens, got {add!r}; e.g. --add 8000")
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(source) for source in sources]
    if not sources:
        raise EloError("elo vocab needs --data SOURCE, the target-language text to learn the new tokens from")
    checkpoint.check_output(out, overwrite=overwrite)
    tokenizer = checkpoint.load_tokenizer(model)
    spec = _tokenizer_json(tokenizer, str(model))
    words, chars = count_words(tokenizer, _documents(sources))
    old_bpe = tokenizer.backend_tokenizer.model
    segmented: Counter[tuple[str, ...]] = Counter()
    for word, n in words.items():
        segmented[tuple(t.value for t in old_bpe.tokenize(word))] += n
    vocab: dict[str, int] = spec["model"]["vocab"]
    known = set(vocab) | {t["content"] for t in spec.get("added_tokens", [])}
    _log(f"learning {add:,} merges from {len(words):,} distinct words ({chars:,} characters)")
    merges = learn_merges(segmented, add, known, ascii_context)
    if len(merges) < add:
        raise EloError(f"the corpus is too small to learn {add:,} new tokens: it yields only {len(merges):,} merges seen "
                       f"at least {MIN_PAIR_COUNT} times; pass --add {max(len(merges), 1):,} or less, or more text")

    weights = checkpoint.load_model(model, dtype=checkpoint.stored_dtype(checkpoint.local_path(model)))
    old_rows = _input_rows(weights)
    used = [*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]
    first = max(len(tokenizer), old_rows, max(used) + 1)
    new_tokens = [a + b for a, b in merges]
    pieces = [[t.id for t in old_bpe.tokenize(token)] for token in new_tokens]
    for i, token in enumerate(new_tokens):
        vocab[token] = first + i
    as_lists = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"].extend([a, b] if as_lists else f"{a} {b}" for a, b in merges)

    tied = weights.get_output_embeddings() is None or (
        weights.get_output_embeddings().weight.data_ptr() == weights.get_input_embeddings().weight.data_ptr())
    weights.resize_token_embeddings(first + add, mean_resizing=False)
    with torch.no_grad():
        matrices = [weights.get_input_embeddings().weight]
        if not tied:
            matrices.append(weights.get_output_embeddings().weight)
        for matrix in matrices:
            if first > old_rows:  # ids no token uses (added tokens past the embedding): the mean row, never random
                matrix[old_rows:first] = matrix[:old_rows].float().mean(0).to(matrix.dtype)
            for i, ids in enumerate(pieces):
                matrix[first + i] = matrix[ids].float().mean(0).to(matrix.dtype)

    from tokenizers import Tokenizer

    extended = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    with checkpoint.atomic_output(out, overwrite=overwrite) as staging:
        weights.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files.write_text(staging / "tokenizer.json", extended.to_str())
        reloaded = checkpoint.load_tokenizer(staging)
        if len(reloaded) != len(tokenizer) + add:
            raise EloError(f"the extended tokenizer reloads with {len(reloaded):,} tokens instead of "
                           f"{len(tokenizer) + add:,}; its class ({type(tokenizer).__name__}) may rebuild it")
        summary = {
            "base_model": str(model), "sources": sources, "added": add,
            "ascii_context": ascii_context, "first_new_id": first, "vocab_size": first + add,
            "tokenizer_length": len(reloaded), "tied_head": tied, "characters": chars,
            "tokens_per_char_before": _tokens_per_char(tokenizer, sources, chars),
            "tokens_per_char_after": _tokens_per_char(reloaded, sources, chars),
            "init": "mean of the old embedding (and untied head) rows of the pieces the old BPE spells the token with",
            "new_tokens": [{"id": first + i, "token": t, "pieces": p} for i, (t, p) in enumerate(zip(new_tokens, pieces))],
        }
        files.write_json(staging / VOCAB_FILE, summary)
    return summary


def new_rows(model_dir: str | Path) -> tuple[int, int] | None:
    """The embedding rows `elo vocab` added to the model in `model_dir` as (first new id, rows), the new tokens'
    rows being first..rows-1; None for a model it did not extend."""
    path = Path(model_dir) / VOCAB_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return int(summary["first_new_id"]), int(summary["vocab_size"])


def held_out_tokens_per_char(before, after, texts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Tokens per character of each text ({language: text}) with the `before` and `after` tokenizers."""
    return {lang: {"before": round(len(before(text, add_special_tokens=False)["input_ids"]) / max(len(text), 1), 4),
                   "after": round(len(after(text, add_special_tokens=False)["input_ids"]) / max(len(text), 1), 4)}
            for lang, text in texts.items()}
