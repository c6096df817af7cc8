"""Training stages on tiny models: what trains, what does not, and resume after an interruption."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from transformers import Trainer

from conftest import logged_steps
from elo_cpt import data, surgery, train
from elo_cpt.config import TrainConfig


def tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_pretrain_trains_only_the_layers(tiny_model, tmp_path, corpora, tokenizer):
    surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
    stats = train.pretrain(tmp_path / "shallow", [str(corpora["train_de"])], tmp_path / "stage1", TrainConfig(lr=1e-3, batch_size=2), seq_len=32)
    # No token budget: one pass over every packed row of the corpus, two rows per step.
    rows = len(data.load_training_data([str(corpora["train_de"])], tokenizer, seq_len=32, cache_dir=False))
    assert (stats.steps, stats.tokens) == (rows // 2, rows * 32) == (67, 4288) and stats.final_loss is not None
    before, after = tensors(tmp_path / "shallow"), tensors(tmp_path / "stage1")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.") for k in changed)
    assert not (tmp_path / "stage1.partial").exists() and not (tmp_path / "stage1" / "checkpoints").exists()
    assert (tmp_path / "stage1" / "elo_provenance.json").is_file()
    assert (tmp_path / "stage1" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "stage1" / "logs").glob("events.out.tfevents.*"))  # TensorBoard


def test_align_trains_every_parameter(tiny_model, tmp_path, corpora):
    stats = train.align(tiny_model, [str(corpora["train_de"]), f"{corpora['train_en']}@0.1"], tmp_path / "aligned",
                        TrainConfig(tokens=640, lr=1e-3, batch_size=2), seq_len=32)
    assert stats.tokens == 640
    before, after = tensors(tiny_model), tensors(tmp_path / "aligned")
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    assert unchanged == set()


def test_interrupted_pretraining_resumes_to_the_same_weights_and_counts_every_invocation(tiny_model, tmp_path, corpora,
                                                                                         monkeypatch, capsys):
    surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
    cfg = TrainConfig(lr=1e-3, batch_size=2, save_steps=3)
    args = ([str(corpora["train_de"])],)
    straight_stats = train.pretrain(tmp_path / "shallow", *args, tmp_path / "straight", cfg, seq_len=32)
    assert straight_stats.resumes == 0
    [straight_logged] = logged_steps(tmp_path / "straight" / "logs")
    every = straight_stats.steps // 20  # logging_steps: 0 logs about 20 points
    assert straight_logged == [s for s, _ in straight_stats.losses] == list(range(every, straight_stats.steps + 1, every))

    original_step = Trainer.training_step
    calls = []
    pause = 0.3  # per step of the interrupted invocation: time that must count in the stage's seconds

    def crash_at_step_8(self, *a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("simulated crash")
        time.sleep(pause)
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.pretrain(tmp_path / "shallow", *args, tmp_path / "resumed", cfg, seq_len=32)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-6").is_dir()
    killed = json.loads((tmp_path / "resumed.partial" / train.CLOCK_FILE).read_text())
    assert killed["invocations"] == 1 and killed["seconds"] >= 7 * pause

    original_train = Trainer.train
    rerun, rerun_steps = [], []

    def timed_train(self, *a, **k):
        start = time.perf_counter()
        try:
            return original_train(self, *a, **k)
        finally:
            rerun.append(time.perf_counter() - start)

    def counted_step(self, *a, **k):
        rerun_steps.append(self.state.global_step)
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", counted_step)
    monkeypatch.setattr(Trainer, "train", timed_train)
    capsys.readouterr()
    stats = train.pretrain(tmp_path / "shallow", *args, tmp_path / "resumed", cfg, seq_len=32)
    # It resumed: from checkpoint-6, it trained only the steps after it (not the whole stage again), and only those
    # are in its own TensorBoard log.
    assert f"resuming from {tmp_path / 'resumed.partial' / 'checkpoints' / 'checkpoint-6'}: run 2" in capsys.readouterr().err
    assert rerun_steps == list(range(6, straight_stats.steps))  # the global step as each optimizer step begins
    resumed_logged = [steps for steps in logged_steps(tmp_path / "resumed" / "logs") if steps[-1:] == straight_logged[-1:]]
    assert resumed_logged == [[s for s in straight_logged if s > 6]]
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    # The stage's seconds are those of both invocations: the rerun's own share plus the interrupted one's.
    assert stats.resumes == 1 and stats.tokens == straight_stats.tokens
    assert stats.seconds >= rerun[0] + killed["seconds"] - 0.01 and stats.seconds > rerun[0] + 7 * pause - 0.01
    recorded = json.loads((tmp_path / "resumed" / train.STATS_FILE).read_text())
    assert (recorded["seconds"], recorded["resumes"]) == (stats.seconds, 1)
    assert not (tmp_path / "resumed" / train.CLOCK_FILE).exists()
