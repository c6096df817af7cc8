"""Conversations to tokens for supervised fine-tuning (stage 3): the model's chat template, the label mask on the
assistant's answers, and the padded training set.

The label mask does not rely on `{% generation %}` markers, which few templates have: each answer is located by
rendering the conversation up to it twice, once ending in the generation prompt and once with the answer; what the
second adds to the first is the answer (up to its end-of-turn token). That holds only if the template is
prefix-stable, which is checked on every record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from elo_cpt import corpus
from elo_cpt.chatdata import Conversation, iter_conversations
from elo_cpt.corpus import Source
from elo_cpt.errors import EloError, first_line

#: The label of a position that is not trained (transformers' and the engine's ignore index).
IGNORE = -100
TEMPLATE_FILE = "chat_template.jinja"


def read_template(path: str | Path) -> str:
    """A Jinja chat template from a file (`--chat-template FILE`)."""
    path = Path(path)
    if not path.is_file():
        raise EloError(f"chat template {path} does not exist; give a Jinja template file (e.g. the chat_template.jinja "
                       "of a model of the same family)")
    template = corpus.read_text(path)
    if "messages" not in template:
        raise EloError(f"{path} is not a chat template (it never reads `messages`); give a Jinja chat template file")
    return template


def write_template(folder: Path, template: str) -> None:
    """Make `template` the chat template of a model folder's tokenizer (chat_template.jinja, and tokenizer_config.json's
    `chat_template` where it has one, so the two never disagree)."""
    (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "chat_template" in config:
            config["chat_template"] = template
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template (or `template`) and marks the answers' tokens.

    `model` names the model in errors.
    """

    def __init__(self, tokenizer, model: str = "the model", template: str | None = None):
        self.tokenizer, self.model, self.template = tokenizer, model, template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise EloError(f"{model} has no chat template (none in tokenizer_config.json or chat_template.jinja); use a "
                           "model whose tokenizer has one, or pass --chat-template FILE (e.g. the chat_template.jinja "
                           "of its Instruct variant)")
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        #: Tokens that can end a turn: the last of them in an answer's span ends what is trained (trailing newlines
        #: a template writes after its end-of-turn token are never generated, so they are not learned either).
        self.special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}

    def render(self, messages: list[dict[str, str]] | tuple, where: str, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 raises TemplateError (and templates raise their own) for what they refuse
            raise EloError(f"the chat template of {self.model} refused {where}: {first_line(err)}; fix the record or "
                           "give a template that takes it (--chat-template FILE)") from None

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the whole conversation and a mask that is true on the answers' tokens (each answer's
        content and its end-of-turn token).

        Answer n's tokens are those that rendering the messages up to it adds to rendering the messages before it
        with the generation prompt. Both renderings must be prefixes of the whole conversation's text, or the
        template is not prefix-stable and this fails. Where the tokens are not prefixes too (the tokenizer merges
        text across the edge of a turn, e.g. a prompt ending in a blank line), the answer is the tokens that
        overlap its characters, from the tokenizer's offsets.
        """
        messages, where = conversation.messages, conversation.where
        texts = [self.render(messages, where)]
        for i in conversation.answers:
            texts += [self.render(messages[:i], where, generation_prompt=True), self.render(messages[: i + 1], where)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        full, offsets = encoded[0], None
        mask = np.zeros(len(full), dtype=bool)
        for n in range(len(conversation.answers)):
            prompt_text, turn_text = texts[1 + 2 * n], texts[2 + 2 * n]
            prompt, turn = encoded[1 + 2 * n], encoded[2 + 2 * n]
            if not (texts[0].startswith(turn_text) and turn_text.startswith(prompt_text)):
                raise EloError(f"the chat template of {self.model} is not prefix-stable: in {where}, the conversation "
                               f"rendered up to answer {n + 1} is not the start of the conversation rendered whole, so "
                               "the answers cannot be located; use a template that renders each turn the same whatever "
                               "follows it (--chat-template FILE)")
            if full[: len(turn)] == turn and turn[: len(prompt)] == prompt:
                start, stop = len(prompt), len(turn)
            else:
                offsets = offsets or self._offsets(texts[0], full, where, n)
                start = next(j for j, (_, end) in enumerate(offsets) if end > len(prompt_text))
                stop = max(j for j, (begin, _) in enumerate(offsets) if begin < len(turn_text)) + 1
            ends = [j for j in range(start, stop) if full[j] in self.special]
            mask[start : ends[-1] + 1 if ends else stop] = True
        if not mask[1:].any():
            raise EloError(f"{where}: the chat template of {self.model} renders no answer tokens for it; check that the "
                           "template writes assistant messages")
        return np.asarray(full, dtype=np.int64), mask

    def _offsets(self, text: str, ids: list[int], where: str, n: int) -> list[tuple[int, int]]:
        """Character offsets of the tokens of `text`, from a tokenizer that gives them."""
        try:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            encoding = {}
        if encoding.get("input_ids") != ids or "offset_mapping" not in encoding:
            raise EloError(f"{where}: the tokenizer of {self.model} merges answer {n + 1} with the text around it into "
                           "shared tokens and cannot map tokens to characters, so the answer cannot be located; edit "
                           "the record's text at the edges of that turn")
        return [tuple(o) for o in encoding["offset_mapping"]]


# ---------------------------------------------------------------- the training set


class ChatDataset(Dataset):
    """Tokenized conversations with their answer masks, held in memory as flat arrays; batches are padded on the
    right by `collate`, and `labels` are -100 except on answer tokens."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, pad_id: int,
                 order: np.ndarray | None = None, summary: dict | None = None):
        self.ids, self.mask, self.offsets, self.pad_id = ids, mask, offsets, pad_id
        self.order = np.arange(len(offsets) - 1) if order is None else np.asarray(order)
        self.summary = summary or {}

    @classmethod
    def from_examples(cls, examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int, summary: dict | None = None) -> ChatDataset:
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([ids for ids, _ in examples]) if examples else np.zeros(0, np.int64)
        mask = np.concatenate([mask for _, mask in examples]) if examples else np.zeros(0, bool)
        return cls(ids.astype(np.int32 if ids.size == 0 or ids.max() < 2**31 else np.int64), mask, offsets, pad_id, summary=summary)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)[self.order]

    @property
    def seq_len(self) -> int:
        """The longest conversation's tokens."""
        return int(self.lengths.max()) if len(self) else 0

    def shuffled(self, order) -> ChatDataset:
        return ChatDataset(self.ids, self.mask, self.offsets, self.pad_id, self.order[np.asarray(order)], self.summary)

    def tokens_of(self, examples: int) -> int:
        """The tokens of the first `examples` conversations in this order, padding excluded."""
        return int(self.lengths[:examples].sum())

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = int(self.order[index])
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        ids = torch.from_numpy(self.ids[start:end].astype(np.int64))
        labels = torch.where(torch.from_numpy(self.mask[start:end]), ids, IGNORE)
        return {"input_ids": ids, "labels": labels}

    def collate(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad a batch on the right: pad tokens are masked from attention and carry label -100, so they add nothing
        to the loss nor to the count of target tokens the loss is divided by."""
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.full((len(features), width), self.pad_id, dtype=torch.long),
                 "labels": torch.full((len(features), width), IGNORE, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            batch["input_ids"][row, :size] = feature["input_ids"]
            batch["labels"][row, :size] = feature["labels"]
            batch["attention_mask"][row, :size] = 1
        return batch


def pad_id(tokenizer) -> int:
    """Any token: padded positions are masked and never targets."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def load_chat_data(sources: list[str | Source], tokenizer, seq_len: int, n_tokens: int | None = None,
                   model: str = "the model", template: str | None = None) -> ChatDataset:
    """The training set of `elo sft`: conversations of `sources` encoded by `ChatEncoder`, in memory.

    Conversations longer than `seq_len` tokens are skipped and counted (cutting one would train on an answer whose
    end is missing, or on none). Without `n_tokens` every conversation is used once; with it, conversations are
    taken until their tokens reach `n_tokens`, and several sources are interleaved so that their shares of the
    messages' UTF-8 bytes follow the weights (as text corpora are mixed). `summary` on the result counts what was
    kept and skipped, per source.
    """
    parsed = [Source.parse(s) for s in sources]
    if not parsed:
        raise EloError("no chat data given; pass --data FILE (repeatable, FILE@WEIGHT to mix)")
    names = [str(s.path) for s in parsed]
    encoder = ChatEncoder(tokenizer, model, template)  # no chat template: stop before reading anything
    mixing = n_tokens is not None and len(parsed) > 1
    shares = corpus.check_weights([s.weight for s in parsed], names) if mixing else [1.0] * len(parsed)
    if not mixing and len({s.weight for s in parsed}) > 1:
        print("warning: data weights apply only with a token budget (--tokens); using every conversation once", file=sys.stderr)
    per_source = [{"conversations": 0, "tokens": 0, "answer_tokens": 0, "bytes": 0, "skipped_too_long": 0} for _ in parsed]

    def encoded(k: int) -> Iterator[tuple[Conversation, np.ndarray, np.ndarray]]:
        for conversation in iter_conversations(parsed[k]):
            ids, mask = encoder.encode(conversation)
            if len(ids) > seq_len:
                per_source[k]["skipped_too_long"] += 1
                continue
            yield conversation, ids, mask

    streams = [encoded(k) for k in range(len(parsed))]
    examples: list[tuple[np.ndarray, np.ndarray]] = []

    def take(k: int, item: tuple[Conversation, np.ndarray, np.ndarray]) -> None:
        conversation, ids, mask = item
        examples.append((ids, mask))
        counts = per_source[k]
        counts["conversations"] += 1
        counts["tokens"] += len(ids)
        counts["answer_tokens"] += int(mask.sum())
        counts["bytes"] += conversation.nbytes

    total = lambda: sum(c["tokens"] for c in per_source)  # noqa: E731
    if not mixing:
        for k, stream in enumerate(streams):
            for item in stream:
                if n_tokens is not None and total() >= n_tokens:
                    break
                take(k, item)
    else:
        heads = [next(stream, None) for stream in streams]
        while total() < n_tokens:
            emitted = [c["bytes"] for c in per_source]
            k = max(range(len(parsed)), key=lambda i: shares[i] * (sum(emitted) + 1) - emitted[i])
            if heads[k] is None:
                raise EloError(f"{names[k]} has too few conversations for {n_tokens:,} tokens at a {shares[k]:.0%} byte "
                               "share; lower --tokens or give it more conversations")
            take(k, heads[k])
            heads[k] = next(streams[k], None)
    skipped = sum(c["skipped_too_long"] for c in per_source)
    if not examples:
        raise EloError(f"every conversation of {', '.join(names)} is longer than --seq-len {seq_len} tokens ({skipped:,} "
                       "skipped); raise --seq-len")
    if n_tokens is not None and total() < n_tokens:
        raise EloError(f"the conversations of {', '.join(names)} make {total():,} tokens, fewer than the {n_tokens:,} asked "
                       f"for ({skipped:,} longer than {seq_len} tokens skipped); lower --tokens or give more conversations")
    summary = {"conversations": len(examples), "tokens": total(), "answer_tokens": sum(c["answer_tokens"] for c in per_source),
               "skipped_too_long": skipped, "seq_len": seq_len,
               "sources": [{"source": name, **counts} for name, counts in zip(names, per_source)]}
    print(f"chat data: {len(examples):,} conversations, {summary['tokens']:,} tokens ({summary['answer_tokens']:,} in "
          f"answers); {skipped:,} longer than {seq_len} tokens skipped", file=sys.stderr)
    return ChatDataset.from_examples(examples, pad_id(tokenizer), summary)
