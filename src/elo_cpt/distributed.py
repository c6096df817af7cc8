"""More than one process (`torchrun`, `accelerate launch`): what is written once is done by the main process while
the others wait; every process trains.

A leaf module. The process group is Accelerate's (gloo on the CPU, NCCL on GPUs), the one Trainer uses too. With
one process every function here is a plain call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

#: How long a process waits for the others, e.g. while the main one builds the mixtures or evaluates. Collectives
#: of a stalled run fail after this; `ELO_DIST_TIMEOUT_MIN` changes it.
TIMEOUT = timedelta(minutes=float(os.environ.get("ELO_DIST_TIMEOUT_MIN", 12 * 60)))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show elo_cpt's progress messages on stderr as `[elo] message`, from the main process only (the others would
    repeat it), unless the application has given the `elo_cpt` logger handlers of its own. The `elo` command calls
    this; a Python program that wants the messages calls it too, or configures `logging` its own way."""
    logger = logging.getLogger("elo_cpt")
    if logger.handlers:
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("[elo] %(message)s"))
    handler.addFilter(lambda record: is_main())
    logger.addHandler(handler)
    logger.setLevel(level)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _join() -> None:
    """Join the process group (once; Trainer later finds it set up)."""
    import torch.distributed
    from accelerate import PartialState

    if not torch.distributed.is_initialized():
        PartialState(timeout=TIMEOUT)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed

        _join()
        torch.distributed.barrier()


def main_only(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on the main process only; every process returns its (picklable) result.

    Should the main process fail, it exits and the launcher stops the others, which are waiting here.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    import torch.distributed

    _join()
    box = [fn(*args, **kwargs) if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first, the others after it: they find what it cached (tokenized data)."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
