"""More than one process (`torchrun`, `accelerate launch`): what is written once is done by the main process while
the others wait; every process trains.

A leaf module. The process group is Accelerate's (gloo on the CPU, NCCL on GPUs), the one Trainer uses too. With
one process every function here is a plain call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

#: How long a process waits for the others, e.g. while the main one builds the mixtures or evaluates. Collectives
#: of a stalled run fail after this; `ELO_DIST_TIMEOUT_MIN` changes it.
TIMEOUT = timedelta(minutes=float(os.environ.get("ELO_DIST_TIMEOUT_MIN", 12 * 60)))


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
