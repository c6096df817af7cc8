"""Chat quality through the model's chat template: answer bits per character on held-out conversations, and greedy
answers to fixed prompts.

Answer bits/char is the sum of -log2 p over the tokens of each assistant answer, given everything before it in its
conversation (system prompt, questions, earlier answers, all rendered by the chat template), divided by the number
of characters of the answers. The tokens are exactly those `elo sft` trains on (`chattokens.ChatEncoder`): the
answer's content and its end-of-turn token, since knowing when to stop is part of answering. Dividing by characters
rather than tokens keeps models with different tokenizers comparable, as bits/char on plain text does
(`evaluation`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from elo_cpt import chatdata, chattokens
from elo_cpt.errors import EloError
from elo_cpt.evaluation import check_eval_settings, load_for_eval


def parse_chats(specs: list[str]) -> dict[str, str]:
    """Parse `LANG=SOURCE` pairs (`elo eval --chat`); SOURCE is any chat data source (`chatdata`)."""
    chats = {}
    for spec in specs:
        lang, sep, source = spec.partition("=")
        if not sep or not source or not re.fullmatch(r"[\w-]+", lang):
            raise EloError(f"bad --chat {spec!r}; write LANG=FILE, e.g. de=held_out_chats.jsonl")
        chats[lang] = source
    return chats


def check_chats(chats: dict[str, str]) -> None:
    """Read every record of the chat sources, so a missing file or a bad record stops before a model is loaded."""
    for source in chats.values():
        for _ in chatdata.iter_conversations(source):
            pass


@torch.no_grad()
def answer_nll(model: PreTrainedModel, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 8) -> float:
    """Total negative log-likelihood (nats) of the masked tokens of `examples` (token ids, answer mask), each
    conditioned on all tokens before it."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    examples = sorted(examples, key=lambda example: len(example[0]))  # batches of similar lengths: little padding
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), chattokens.IGNORE, dtype=torch.long)
            for row, (ids, mask) in enumerate(batch):
                ids = torch.from_numpy(ids.astype(np.int64))
                tokens[row, : len(ids)] = ids
                attention[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.where(torch.from_numpy(mask), ids, chattokens.IGNORE)
            tokens, attention, labels = tokens.to(device), attention.to(device), labels.to(device)
            logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=chattokens.IGNORE, reduction="sum"))
    finally:
        model.train(was_training)
    return total


def answer_bits_per_char(model: PreTrainedModel, tokenizer, source: str, seq_len: int = 256, batch_size: int = 8,
                         template: str | None = None, model_name: str = "the model") -> dict:
    """Answer bits per character (and per UTF-8 byte) of the conversations of one source, with the counts they come
    from. Conversations longer than `seq_len` tokens are skipped and counted, as `elo sft` skips them."""
    encoder = chattokens.ChatEncoder(tokenizer, model_name, template)
    examples, chars, nbytes, skipped = [], 0, 0, 0
    for conversation in chatdata.iter_conversations(source):
        ids, mask = encoder.encode(conversation)
        if len(ids) > seq_len:
            skipped += 1
            continue
        examples.append((ids, mask))
        chars += conversation.answer_chars
        nbytes += conversation.answer_bytes
    if not examples or not chars:
        raise EloError(f"no conversation of {source} has answer text within --seq-len {seq_len} tokens ({skipped} longer "
                       "skipped); raise --seq-len")
    bits = answer_nll(model, examples, batch_size) / math.log(2)
    return {
        "answer_bits_per_char": bits / chars,
        "answer_bits_per_byte": bits / nbytes,
        "answer_chars": chars,
        "answer_tokens": int(sum(int(mask[1:].sum()) for _, mask in examples)),
        "conversations": len(examples),
        "skipped_too_long": skipped,
    }


def evaluate_chat(
    model: str | Path | PreTrainedModel,
    chats: dict[str, str | Path],
    tokenizer=None,
    seq_len: int = 256,
    batch_size: int = 8,
    chat_template: str | Path | None = None,
) -> dict[str, dict]:
    """Answer bits/char per language of a model folder or an in-memory model on held-out conversations
    ({lang: chat source}); `chat_template` is a Jinja file to use instead of the tokenizer's template."""
    if not chats:
        raise EloError("no held-out conversations given; pass --chat LANG=FILE")
    check_eval_settings(seq_len, batch_size)
    template = chattokens.read_template(chat_template) if chat_template is not None else None
    name = str(model) if not isinstance(model, PreTrainedModel) else getattr(model, "name_or_path", "") or "the model"
    if not isinstance(model, PreTrainedModel):
        model, tokenizer = load_for_eval(model, tokenizer)
    if tokenizer is None:
        raise EloError("evaluating an in-memory model needs its tokenizer")
    return {lang: answer_bits_per_char(model, tokenizer, str(source), seq_len, batch_size, template, name)
            for lang, source in chats.items()}


def stop_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """The tokens that end an answer: the generation config's eos ids and the tokenizer's eos token."""
    found = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = found if isinstance(found, list) else [found]
    return sorted({int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None})


def chat_answers(model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                 template: str | None = None, system: str | None = None) -> list[str]:
    """Greedy answers to `prompts`, each asked as the only user message (after `system`, if given) through the chat
    template (`template`: Jinja text to use instead of the tokenizer's); generation stops at an end-of-turn token or
    after `max_new_tokens`. Greedy, one prompt at a time (no padding), so an answer is a property of the model,
    comparable before and after training."""
    return [found["answer"] for found in chat_samples(model, tokenizer, prompts, max_new_tokens, template, system)]


@torch.no_grad()
def chat_samples(model: PreTrainedModel, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                 template: str | None = None, system: str | None = None) -> list[dict]:
    """`chat_answers` with what each answer took: [{prompt, answer, new_tokens, ended}], `ended` true when the model
    stopped at an end-of-turn token rather than at `max_new_tokens`."""
    encoder = chattokens.ChatEncoder(tokenizer, getattr(model, "name_or_path", "") or "the model", template)
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = chattokens.pad_id(tokenizer)
    was_training = model.training
    model.eval()
    found = []
    try:
        for number, prompt in enumerate(prompts, 1):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = encoder.render(messages, f"prompt {number}", generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stops or None, pad_token_id=pad,
                                    temperature=None, top_p=None, top_k=None)
            new = output[0, ids.shape[1] :]
            found.append({"prompt": prompt, "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
                          "new_tokens": len(new), "ended": bool(len(new) and int(new[-1]) in stops)})
    finally:
        model.train(was_training)
    return found
