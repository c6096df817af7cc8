"""Where elo-cpt keeps its files, and the one way it writes a file that something else may read.

A leaf module of the standard library alone. Every writer here writes a temporary file beside the target (a
hidden name ending in `.tmp`, unique to the writer, so concurrent writers never share one), flushes it to disk and
renames it over the target: a reader sees the old file or the new one, never half of one, and on an error, a full
disk or Ctrl-C the temporary file is removed and the old file stays. Folders are built the same way, in a staging
folder renamed when complete: model outputs by `checkpoint.atomic_output` (which keeps a training stage's staging
folder for resuming), the run's mixtures by `pipeline.build_data`, the converted demo model by `assets`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """$ELO_CPT_CACHE if set, else $XDG_CACHE_HOME/elo-cpt, else ~/.cache/elo-cpt."""
    if os.environ.get("ELO_CPT_CACHE"):
        return Path(os.environ["ELO_CPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "elo-cpt"


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (any way it likes: a stream, a memory map, a plot);
    it replaces `path` when the block completes, and is removed if the block fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash never publishes an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file whole or not at all."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON (indented, a newline at the end) whole or not at all."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
