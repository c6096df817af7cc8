"""Benchmarks through lm-evaluation-harness, on a model folder or on a model already in memory.

Any task, group or tag lm-eval knows can be named (kobest_copa, kmmlu, japanese_leaderboard, mmlu, ...), and
local tasks come from YAML files in `include_path`, exactly as `lm_eval --include_path` reads them. Models are
loaded by elo itself (safetensors only, no remote code) and handed to lm-eval's HFLM wrapper, so the same
in-memory model can be evaluated right after training without saving it first.

Data: hub tasks download their datasets through the `datasets` library on first use; offline
(HF_DATASETS_OFFLINE=1) they must already be cached. Relative `data_files` in a local task resolve against the
current directory, as in lm-eval.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from elo_cpt import evaluation
from elo_cpt.errors import EloError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def parse_tasks(spec: str | list[str]) -> list[str]:
    """Task names from `a,b` or a list, in order, without blanks or repeats."""
    names = spec.split(",") if isinstance(spec, str) else spec
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def task_manager(tasks: list[str], include_path: str | Path | None = None) -> TaskManager:
    """An lm-eval TaskManager that knows every task in `tasks`, or a one-line error naming the unknown ones.

    Indexing lm-eval's ~15,000 built-in task files takes seconds, so when every task is local only
    `include_path` is indexed.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise EloError("no lm-eval task given; name tasks, e.g. --tasks kobest_copa,mmlu")
    if include_path is not None and not Path(include_path).is_dir():
        raise EloError(f"lm-eval include path {include_path} is not a folder; pass the folder holding your task YAML files")
    named = [t for t in tasks if not _is_task_file(t)]
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in named):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in named if t not in manager.all_tasks]
    if unknown:
        guesses = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        local = "" if include_path is not None else ", and local tasks need --include-path DIR"
        raise EloError(f"unknown lm-eval task {', '.join(unknown)}; {hint}`lm_eval ls tasks` lists the built-in ones{local}")
    return manager


@contextlib.contextmanager
def _quiet(logger: str):
    # HFLM warns that a model object disables its loading options; elo loads the model itself on purpose.
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _numbers(values: dict) -> dict[str, float]:
    """lm-eval's `metric,filter` keys as `metric` (or `metric,filter` for filters other than none); numbers only."""
    out = {}
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "sample_len":
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = None if math.isnan(value) else float(value)
    return out


def compact_results(raw: dict) -> dict[str, dict]:
    """{task: {metrics: {...}, stderr: {...}, samples, higher_is_better, version}} from lm-eval's result dict."""
    tasks = {}
    for name, values in raw.get("results", {}).items():
        numbers = _numbers(values)
        tasks[name] = {
            "metrics": {k: v for k, v in numbers.items() if "_stderr" not in k},
            "stderr": {k.replace("_stderr", ""): v for k, v in numbers.items() if "_stderr" in k},
            "samples": raw.get("n-samples", {}).get(name, {}).get("effective"),
            "higher_is_better": raw.get("higher_is_better", {}).get(name, {}),
            "version": raw.get("versions", {}).get(name),
        }
    return tasks


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer,
    tasks: list[str],
    manager: TaskManager,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    chat_template: bool = False,
) -> dict:
    """lm-eval's own result dictionary for an in-memory model (with per-sample records if `log_samples`); with
    `chat_template`, each request goes through the tokenizer's chat template, few-shot examples as earlier turns
    (lm-eval's apply_chat_template and fewshot_as_multiturn)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # HFLM switches the model to eval mode; the caller gets it back in the mode it gave.
    was_training = model.training
    try:
        with _quiet("lm_eval.models.huggingface"):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=False)
        return simple_evaluate(lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               log_samples=log_samples, apply_chat_template=chat_template,
                               fewshot_as_multiturn=chat_template)
    except (FileNotFoundError, ConnectionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EloError(
            f"an lm-eval task could not load its data ({reason}); hub datasets need the network once "
            "(or a filled HF_DATASETS_CACHE offline), local data_files resolve against the current directory"
        ) from None
    finally:
        model.train(was_training)


def evaluate_tasks(
    model: str | Path | PreTrainedModel,
    tasks: str | list[str],
    tokenizer=None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    manager: TaskManager | None = None,
) -> dict[str, dict]:
    """lm-eval scores of a model folder or an in-memory model: {task: {metrics, stderr, samples, ...}}.

    Groups (e.g. mmlu) appear with their aggregate next to their subtasks. `manager`, from `task_manager()`, saves
    indexing the tasks again; task names are checked before a model folder is loaded.
    """
    tasks = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise EloError(f"--limit must be at least 1, got {limit}")
    manager = manager or task_manager(tasks, include_path)
    if not isinstance(model, PreTrainedModel):
        model, tokenizer = evaluation.load_for_eval(model, tokenizer)
    if tokenizer is None:
        raise EloError("evaluating an in-memory model needs its tokenizer")
    return compact_results(run_lm_eval(model, tokenizer, tasks, manager, limit, batch_size, num_fewshot))
