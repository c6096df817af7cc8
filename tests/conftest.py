"""Shared fixtures: tiny random Hugging Face models of several architectures, with a real fast tokenizer."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (pyproject's addopts run one worker per core), each worker and the commands it starts share the
# cores instead of each spinning one thread per core.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-data cache entries of test corpora stay out of the user's cache (subprocesses inherit this); the folder
# made here goes when the test session ends.
if "ELO_CPT_TOKEN_CACHE" not in os.environ:
    os.environ["ELO_CPT_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="elo-cpt-test-tokens-")
    atexit.register(shutil.rmtree, os.environ["ELO_CPT_TOKEN_CACHE"], ignore_errors=True)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

#: The longest tests, in seconds on 2 busy CI cores with one thread each (`pytest --durations=50`). Under xdist they
#: start first, dealt out so that each worker begins with an equal share (see pytest_collection_modifyitems).
LONG_TESTS = {
    "test_default_pipeline_on_smollm2_improves_german": 1790, "test_sft_on_smollm2_lowers_held_out_german_answer_bits_per_char": 750,
    "test_bf16_mixed_stage1_tracks_fp32_on_smollm2": 500, "test_study_runs_every_method_and_resumes": 260,
    "test_stage_by_stage": 160, "test_vocab_cells_share_one_extension_and_count_characters": 120, "test_study_cells_train_on_two_processes": 130, "test_bench_cli_smoke": 100,
    "test_sigkill_and_rerun_gives_the_uninterrupted_weights": 90, "test_killing_one_rank_then_rerunning_resumes": 80,
    "test_detach_and_merge_of_a_3gb_checkpoint_stay_far_below_its_size": 80,
}


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's work stealing, worker i starts with the i-th equal part of the test list and steals from
    the end of the others' parts once its own is done. A long test at the end of a part would start last and decide
    when the suite ends; so the long tests go first, each to the part with the least long work so far, and the
    other tests, in their usual order, fill the parts to equal counts."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2 or len(items) < 2 * workers:
        return
    cost = {item: LONG_TESTS.get(item.originalname, 0) for item in items}
    parts, loads = [[] for _ in range(workers)], [0] * workers
    for item in sorted((i for i in items if cost[i]), key=cost.get, reverse=True):
        part = loads.index(min(loads))
        parts[part].append(item)
        loads[part] += cost[item]
    rest = [item for item in items if not cost[item]]
    for i, part in enumerate(parts):
        size = len(items) // workers if i < workers - 1 else len(items)  # the last part takes the remainder
        take = max(0, size - len(part))
        part += rest[:take]
        del rest[:take]
    items[:] = [item for part in parts for item in part] + rest


FIXTURES = Path(__file__).parent / "fixtures"
TEXT = FIXTURES / "text"
VOCAB = 384

_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
#: Tiny configs of the architectures users bring; per-layer attention types where the family has them.
ARCHITECTURES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True, **_SMALL),
    "mistral": dict(model_type="mistral", sliding_window=8, **_SMALL),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2, **_SMALL),
    "qwen3": dict(model_type="qwen3", head_dim=8, **_SMALL),
    "gemma2": dict(model_type="gemma2", head_dim=8, sliding_window=8, **_SMALL),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=8, sliding_window=8, eos_token_id=0, bos_token_id=0, pad_token_id=0, **_SMALL),
    "phi3": dict(model_type="phi3", pad_token_id=0, bos_token_id=0, eos_token_id=0, **_SMALL),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_head=4, n_positions=512, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
}


def free_port() -> int:
    """A TCP port free right now, for a torchrun rendezvous: parallel test runs must not share a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def logged_steps(logs: Path, tag: str = "train/loss") -> list[list[int]]:
    """The steps at which each TensorBoard event file in a stage's `logs/` recorded `tag`: one list per invocation
    that trained the stage (each writes a file of its own)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [[event.step for event in EventFileLoader(str(path)).Load() if any(v.tag == tag for v in event.summary.value)]
            for path in sorted(logs.glob("events.out.tfevents.*"))]


def assert_resumed(stderr: str, partial: Path, straight: Path, resumed: Path, steps: int, every: int) -> None:
    """A killed stage's rerun resumed, not restarted: it names the last complete checkpoint of `partial` it resumed
    from, and its TensorBoard file logs only the steps after it, where the uninterrupted run logged every one."""
    found = re.search(rf"resuming from {re.escape(str(partial))}/checkpoint-(\d+): run 2 of this stage", stderr)
    assert found, stderr[-3000:]
    resumed_at = int(found.group(1))
    assert resumed_at in range(every, steps, every)  # the newest checkpoint may have been cut short: then the one before
    assert logged_steps(straight / "logs") == [list(range(1, steps + 1))]
    assert [s for s in logged_steps(resumed / "logs") if s[-1:] == [steps]] == [list(range(resumed_at + 1, steps + 1))]


@contextlib.contextmanager
def crash_at_step(step: int):
    """Trainer raises RuntimeError("simulated crash") as its `step`-th training step begins (an interrupted run);
    the `with` block must expect it."""
    from transformers import Trainer

    original, calls = Trainer.training_step, []

    def crashing(self, *a, **k):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    Trainer.training_step = crashing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        Trainer.training_step = original


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the fixture texts (seconds, no network)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(TEXT / "de.txt"), str(TEXT / "en.txt")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def save_tiny_model(path: Path, arch: str = "llama", num_layers: int = 5, seed: int = 0) -> Path:
    """Write a tiny random model of architecture `arch` with the fixture tokenizer to `path`."""
    settings = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(settings.pop("model_type"), num_hidden_layers=num_layers, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def corpora(tmp_path) -> dict[str, Path]:
    """Training corpora (JSONL, repeated fixture paragraphs) and held-out evaluation texts."""
    paths = {}
    for lang in ("de", "en"):
        paragraphs = (TEXT / f"{lang}.txt").read_text().split("\n\n")
        path = tmp_path / f"train_{lang}.jsonl"
        with path.open("w") as f:
            for i in range(40):
                f.write(json.dumps({"text": f"{i}. {paragraphs[i % len(paragraphs)]}"}, ensure_ascii=False) + "\n")
        paths[f"train_{lang}"] = path
        paths[f"eval_{lang}"] = TEXT / f"{lang}.txt"
    return paths
