"""The cost of a training stage over every invocation that trained it, interrupted ones included.

A Trainer callback keeps the running total in the stage's staging folder, where a rerun that resumes the stage
finds it. Of elo_cpt it imports only the atomic JSON writer (files).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from elo_cpt import files

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
            files.write_json(self.path, {"seconds": round(self.seconds, 3), "invocations": self.invocations})
        self.saved = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.save()  # every process has read the earlier total by now: wrapping the model for DDP synchronises them

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.saved >= self.every:
            self.save()

    def on_save(self, args, state, control, **kwargs):
        self.save()


class Timings:
    """Wall-clock seconds per pipeline step, kept in the run folder so a resumed run still reports them.

    A step's seconds add up over every invocation that ran it: while a step runs, its total so far is written every
    `every` seconds (a background thread; a SIGKILL gives no chance to write at exit), so a rerun that repeats an
    interrupted step adds its seconds to those the killed invocation spent on it.
    """

    def __init__(self, path: Path, every: float = 1.0, write: bool = True):
        self.path, self.every, self.write = path, every, write  # write: False on all but the main process
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self._lock = threading.Lock()

    def _record(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = round(seconds, 2)
            files.write_json(self.path, self.seconds)

    @contextlib.contextmanager
    def step(self, name: str):
        if not self.write:
            yield
            return
        earlier = self.seconds.get(name, 0.0)  # an invocation that was interrupted in this step
        start = time.perf_counter()
        done = threading.Event()

        def heartbeat():
            while not done.wait(self.every):
                self._record(name, earlier + time.perf_counter() - start)

        thread = threading.Thread(target=heartbeat, name=f"timings {name}", daemon=True)
        thread.start()
        try:
            yield
        finally:  # also on an error or Ctrl-C: the rerun adds its seconds to these
            done.set()
            thread.join()
            self._record(name, earlier + time.perf_counter() - start)
