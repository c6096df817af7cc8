"""Language-modelling quality on held-out text, in bits per character and bits per UTF-8 byte.

Per-token perplexity ranks languages backwards (one tokenizer splits Korean far finer than English), so the
total negative log-likelihood of a text is divided by its length in characters or bytes instead. The text is
cut into windows of `seq_len` tokens; each window is fed with the token before it (a separator for the first),
so every token of the text is predicted exactly once.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from elo_cpt import checkpoint, config, corpus, data
from elo_cpt.errors import EloError


def read_eval_text(path: str | Path, max_chars: int = 0) -> str:
    """The evaluation text, cut at the last paragraph boundary before `max_chars` (0: all of it)."""
    path = Path(path)
    if not path.is_file():
        raise EloError(f"evaluation text {path} does not exist; check the path")
    text = corpus.read_text(path).strip()  # a few invalid bytes are replaced with a warning; a binary file is refused
    if not text:
        raise EloError(f"evaluation text {path} is empty")
    if max_chars and len(text) > max_chars:
        cut = text.rfind("\n\n", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    return text


@torch.no_grad()
def text_nll(model: PreTrainedModel, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8, desc: str = "") -> tuple[float, int]:
    """Total negative log-likelihood (nats) of `text` under `model`, and its number of tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = [data.separator_id(tokenizer)] + ids
    windows = [context[start : start + seq_len + 1] for start in range(0, len(ids), seq_len)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False, disable=len(windows) <= batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, window in enumerate(batch):
            tokens[row, : len(window)] = torch.tensor(window)
            mask[row, : len(window)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        logits = model(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        total += float((nll * mask[:, 1:]).sum())
    model.train(was_training)
    return total, len(ids)


def bits_per_char(model: PreTrainedModel, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8, desc: str = "") -> dict:
    """Bits per character and per UTF-8 byte of `text`, with the counts they come from."""
    nll, tokens = text_nll(model, tokenizer, text, seq_len, batch_size, desc)
    bits = nll / math.log(2)
    return {
        "bits_per_char": bits / len(text),
        "bits_per_byte": bits / len(text.encode("utf-8")),
        "chars": len(text),
        "tokens": tokens,
    }


def check_eval_settings(seq_len: int, batch_size: int, max_chars: int = 0) -> None:
    """Refuse evaluation settings that cannot work, before a model is loaded."""
    config.check_seq_len(seq_len)
    if batch_size < 1:
        raise EloError(f"--batch-size must be at least 1, not {batch_size}")
    if max_chars < 0:
        raise EloError(f"--max-chars must be >= 0 (0 uses all of each text), not {max_chars}")


def parse_texts(specs: list[str]) -> dict[str, Path]:
    """Parse `LANG=PATH` pairs."""
    texts = {}
    for spec in specs:
        lang, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[\w-]+", lang):
            raise EloError(f"bad --text {spec!r}; write LANG=PATH, e.g. de=held_out_de.txt")
        texts[lang] = Path(path)
    return texts


def load_for_eval(path: str | Path, tokenizer=None) -> tuple[PreTrainedModel, object]:
    """A model folder loaded for evaluation (safetensors only), on the GPU when there is one, and its tokenizer."""
    path = checkpoint.require_model_dir(path)
    tokenizer = tokenizer or checkpoint.load_tokenizer(path)  # first: a missing tokenizer fails before the model loads
    model = checkpoint.load_model(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def evaluate(
    model: str | Path | PreTrainedModel,
    texts: dict[str, str | Path],
    tokenizer=None,
    seq_len: int = 256,
    max_chars: int = 0,
    batch_size: int = 8,
) -> dict[str, dict]:
    """Bits/char per language of a model folder or an in-memory model on held-out texts."""
    if not texts:
        raise EloError("no evaluation text given; pass --text LANG=PATH")
    check_eval_settings(seq_len, batch_size, max_chars)
    loaded = {lang: read_eval_text(path, max_chars) for lang, path in texts.items()}
    if not isinstance(model, PreTrainedModel):
        model, tokenizer = load_for_eval(model, tokenizer)
    if tokenizer is None:
        raise EloError("evaluating an in-memory model needs its tokenizer")
    return {lang: bits_per_char(model, tokenizer, text, seq_len, batch_size, desc=f"eval {lang}") for lang, text in loaded.items()}
