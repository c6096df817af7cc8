"""Chat data for supervised fine-tuning (stage 3): conversations read from files and datasets, checked, in one
shape. `chattokens` renders them with the model's chat template and marks the answers to train on.

Sources are written `SOURCE[#FIELD][@WEIGHT]` as for text corpora (see `corpus`): a .jsonl, .json or .parquet file,
a folder or glob of them, a `save_to_disk` folder or hf:NAME[:CONFIG[:SPLIT]]. A record holds one conversation in
either common format:

    messages       {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                   (Hugging Face chat datasets; roles system, user, assistant)
    conversations  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
                   (ShareGPT; from system, human, gpt)

Both become the same messages ({role, content}, content stripped), so both give the same tokens.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elo_cpt import corpus
from elo_cpt.corpus import TEXT_FIELD, TOKENIZE_BATCH, Source
from elo_cpt.errors import EloError, first_line

#: File types read as chat data (a .json file is a JSON array of records, or JSON Lines as `Dataset.to_json` writes).
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
#: Where a record keeps its conversation, unless SOURCE#FIELD names another field.
FIELDS = ("messages", "conversations")
#: Roles of both formats, mapped to the roles chat templates know.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Conversation:
    """Messages as chat templates take them ({role, content}), and where the record came from (for errors)."""

    messages: tuple[dict[str, str], ...]
    where: str

    @property
    def answers(self) -> list[int]:
        """Indices of the answers that are trained: assistant messages after the first message (an opening
        assistant message has no prompt to answer, so it is context)."""
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant" and i > 0]

    @property
    def answer_chars(self) -> int:
        return sum(len(self.messages[i]["content"]) for i in self.answers)

    @property
    def answer_bytes(self) -> int:
        return sum(len(self.messages[i]["content"].encode()) for i in self.answers)

    @property
    def nbytes(self) -> int:
        """UTF-8 bytes of every message's content: what mixing weights share out."""
        return sum(len(m["content"].encode()) for m in self.messages)


# ---------------------------------------------------------------- records


def _content(value: object) -> str | None:
    """A message's text: a string, or the text parts of a list of {type: text, text} parts (multimodal format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    return None


def _neither(names: tuple[str, ...]) -> str:
    return f"neither {names[0]!r} nor {names[1]!r}" if len(names) == 2 else f"no {names[0]!r}"


def to_conversation(record: object, where: str, field: str | None = None) -> Conversation:
    """The conversation of one record (either format, or the list under `field`), checked; a one-line EloError
    naming the record otherwise."""
    names = (field,) if field else FIELDS
    if not isinstance(record, dict):
        raise EloError(f"{where} is not a JSON object; each record must hold a {' or '.join(map(repr, names))} list")
    name = next((n for n in names if record.get(n) is not None), None)
    if name is None:
        has = ", ".join(map(str, record)) or "no fields"
        raise EloError(f"{where} has {_neither(names)} (it has {has}); give each record a "
                       "'messages' list of {role, content} or a ShareGPT 'conversations' list of {from, value}, or name "
                       "the field with SOURCE#FIELD")
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise EloError(f"{where}: {name!r} must be a non-empty list of messages")
    messages = []
    for number, turn in enumerate(turns, 1):
        if isinstance(turn, dict) and turn.get("role") is not None:
            role, content = turn["role"], _content(turn.get("content"))
        elif isinstance(turn, dict) and turn.get("from") is not None:
            role, content = turn["from"], _content(turn.get("value"))
        else:
            raise EloError(f"{where}: message {number} has neither role and content nor from and value; write "
                           "{role, content} (messages) or {from, value} (ShareGPT)")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise EloError(f"{where}: message {number} has role {role!r}; the roles understood are system, user and "
                           "assistant (ShareGPT: system, human and gpt)")
        if content is None:
            raise EloError(f"{where}: message {number} has no text (a string under 'content' or 'value')")
        # Stripped: whitespace at the edges of a turn would let the tokenizer merge it with the template's text.
        messages.append({"role": ROLES[role.lower()], "content": content.strip()})
    conversation = Conversation(tuple(messages), where)
    if not conversation.answers:
        raise EloError(f"{where} has no assistant answer after a prompt; each conversation needs at least one "
                       "answer to learn (role assistant, or gpt in ShareGPT)")
    return conversation


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in corpus.text_lines(path):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError:
                raise EloError(f"{path}:{number} is not valid JSON; each line must be one conversation record") from None


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """A JSON array of records (as ShareGPT dumps are), one record, or JSON Lines (as `Dataset.to_json` writes)."""
    text = corpus.read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise EloError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); give a JSON array of records "
                           "or one record per line") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for number, line in lines:
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError:
                raise EloError(f"{path}:{number} is not valid JSON; give a JSON array of records or one record "
                               "per line") from None
        return
    if isinstance(whole, list):
        yield from ((f"{path} record {i}", record) for i, record in enumerate(whole, 1))
    else:
        yield str(path), whole


def _table_rows(rows: Iterator[dict], label: str, columns: list[str], field: str | None) -> Iterator[tuple[str, object]]:
    names = (field,) if field else FIELDS
    if not any(n in columns for n in names):
        raise EloError(f"{label} has {_neither(names)} column (it has {', '.join(columns)}); "
                       "name the column with SOURCE#FIELD")
    return ((f"{label} row {i}", row) for i, row in enumerate(rows, 1))


def _parquet_records(path: Path, field: str | None) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    except Exception as err:  # pyarrow raises several types for damaged files
        raise EloError(f"cannot read Parquet file {path}: {first_line(err)}") from None
    wanted = [c for c in ((field,) if field else FIELDS) if c in columns]
    rows = (row for batch in parquet.iter_batches(batch_size=TOKENIZE_BATCH, columns=wanted) for row in batch.to_pylist())
    yield from _table_rows(rows, str(path), columns, field)


def _dataset_records(path: Path, field: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise EloError(f"{path} holds several splits ({', '.join(dataset)}); point at one split's folder")
    yield from _table_rows(iter(dataset), str(path), dataset.column_names, field)


def _hub_records(path: Path, field: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    name, config, split = corpus.hub_parts(path)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(stream)
        first = next(rows, None)
        if first is None:
            return
        yield from _table_rows(itertools.chain([first], rows), str(path), list(first), field)
    except EloError:
        raise
    except Exception as err:  # missing dataset, bad split, network, parse errors
        reason = first_line(err)
        hint = ("; hub datasets need the network: unset HF_HUB_OFFLINE, or save_to_disk the dataset where you are "
                "online and point at that folder" if "offline" in reason.lower() else "")
        raise EloError(f"cannot read dataset {path}: {reason}{hint}") from None


def _file_records(path: Path, field: str | None) -> Iterator[tuple[str, object]]:
    if path.is_dir():
        return _dataset_records(path, field)
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    if path.suffix == ".json":
        return _json_records(path)
    if path.suffix == ".parquet":
        return _parquet_records(path, field)
    raise EloError(f"{path}: chat data must be .jsonl, .json or .parquet (or a save_to_disk folder), not {path.suffix or 'a file without suffix'}")


def iter_conversations(spec: str | Source) -> Iterator[Conversation]:
    """The conversations of a source written `SOURCE[#FIELD][@WEIGHT]`, in order, checked, streamed (a .json file is
    read whole). An empty source is an error at its end."""
    source = Source.parse(spec)
    field = None if source.field == TEXT_FIELD else source.field
    if source.hub:
        readers = [_hub_records(source.path, field)]
    else:
        readers = [_file_records(f, field) for f in corpus.source_files(source.path, CHAT_SUFFIXES)]
    empty = True
    for where, record in itertools.chain.from_iterable(readers):
        empty = False
        yield to_conversation(record, where, field)
    if empty:
        raise EloError(f"chat data {source.path} holds no conversations; give it some")
