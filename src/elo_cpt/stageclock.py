"""A training stage's staging folder, its checkpoints, its loss plot, and its cost over every invocation that
trained it, interrupted ones included.

A Trainer callback keeps the running total in the stage's staging folder, where a rerun that resumes the stage
finds it. Of elo_cpt it imports only the output helpers (checkpoint) and the process rank (distributed).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainerCallback

from elo_cpt import checkpoint, distributed

#: The running total of a stage's training seconds and invocations, in its staging folder (`OUT.partial/`).
CLOCK_FILE = "stage_clock.json"


class StageClock(TrainerCallback):
    """Wall-clock training seconds of a stage over every invocation, and how many there were.

    A SIGKILL leaves no chance to write at exit, so the running total is written to `path` as training goes (at the
    start, at most once a second at step ends, at each checkpoint and at the end): a rerun that resumes the stage
    adds its own seconds to those of the invocations before it, including the work they lost after their last
    checkpoint. Only the main process writes.
    """

    def __init__(self, path: Path, write: bool = True, every: float = 1.0):
        self.path, self.write, self.every = path, write, every
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        self.earlier_seconds = float(earlier.get("seconds", 0.0))
        self.invocations = int(earlier.get("invocations", 0)) + 1
        self.start = self.saved = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.start

    def begin(self) -> None:
        self.start = time.perf_counter()

    def save(self) -> None:
        if self.write:
            checkpoint.write_json(self.path, {"seconds": round(self.seconds, 3), "invocations": self.invocations})
        self.saved = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.save()  # every process has read the earlier total by now: wrapping the model for DDP synchronises them

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.saved >= self.every:
            self.save()

    def on_save(self, args, state, control, **kwargs):
        self.save()


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose files were all written, deleting any a crash left half-written.

    Trainer writes `trainer_state.json` last, so a checkpoint is complete when that file parses and names the
    checkpoint's step.
    """
    if not folder.is_dir():
        return None
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for candidate in reversed(checkpoints):
        try:
            state = json.loads((candidate / "trainer_state.json").read_text())
            if state.get("global_step") == int(candidate.name.split("-")[-1]):
                return str(candidate)
        except (OSError, ValueError):
            pass
        shutil.rmtree(candidate, ignore_errors=True)
    return None


@contextlib.contextmanager
def stage_output(out: str | Path) -> Iterator[tuple[Path, bool]]:
    """The staging folder of a training stage, and whether this process writes the result.

    Under torchrun every process trains, but only the main one saves and renames the output.
    """
    main = distributed.is_main()
    if main:
        staging = checkpoint.staging_path(Path(out))
        fresh = not staging.exists()

        def keep(err: BaseException) -> bool:
            # An interruption, or a failure after a checkpoint, is resumed by rerunning; an error in a stage this
            # invocation started, before any checkpoint, leaves nothing behind.
            return not fresh or not isinstance(err, Exception) or last_complete_checkpoint(staging / "checkpoints") is not None

        with checkpoint.atomic_output(out, keep_partial=keep) as staging:
            yield staging, True
    else:
        yield checkpoint.staging_path(Path(out)), False


def save_loss_plot(losses: list[tuple[int, float]], path: Path) -> None:
    """The stage's training loss against optimizer steps, as a PNG beside the model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot([s for s, _ in losses], [loss for _, loss in losses], marker="." if len(losses) < 30 else None)
    axes.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title=f"{path.parent.name.removesuffix('.partial')}: loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
