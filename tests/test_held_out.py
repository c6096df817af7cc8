"""The held-out loss during training (`eval_steps`, Trainer's evaluation loop): logged at the right steps, equal to
the trained model's loss on the same rows, and refused clearly when half asked for."""

from __future__ import annotations

import json

import pytest
import torch

from elo_cpt import checkpoint, cli, data, evaluation, train
from elo_cpt.config import TrainConfig


def test_held_out_loss_is_logged_every_n_steps_and_at_the_end(tiny_model, corpora, tmp_path):
    cfg = TrainConfig(tokens=32 * 14, lr=1e-3, batch_size=2, eval_steps=3, save_steps=100, loss_chunk=8)  # the chunked loss
    held_out = {"de": corpora["eval_de"], "en": corpora["eval_en"]}
    stats = train.finetune(tiny_model, [str(corpora["train_de"])], tmp_path / "out", cfg, seq_len=32, held_out=held_out)
    assert stats.steps == 7
    assert {lang: [step for step, _ in points] for lang, points in stats.eval_losses.items()} == {"de": [3, 6, 7], "en": [3, 6, 7]}
    assert json.loads((tmp_path / "out" / train.STATS_FILE).read_text())["eval_losses"]["de"][-1][0] == 7
    # The last point is the trained model's mean next-token loss on the held-out rows.
    model, tokenizer = checkpoint.load_model(tmp_path / "out").eval(), checkpoint.load_tokenizer(tmp_path / "out")
    rows = data.pack([evaluation.read_eval_text(corpora["eval_de"], train.HELD_OUT_CHARS)], tokenizer, 32)
    with torch.no_grad():
        losses = [model(input_ids=rows[i:i + 2], labels=rows[i:i + 2]).loss for i in range(0, len(rows), 2)]
    # Trainer averages the batches' mean losses, as computed here
    assert stats.eval_losses["de"][-1][1] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    assert stats.eval_losses["de"][0][1] > stats.eval_losses["de"][-1][1]  # it learned from German text


def test_no_held_out_loss_unless_asked(tiny_model, corpora, tmp_path):
    cfg = TrainConfig(tokens=32 * 8, lr=1e-3, batch_size=2, save_steps=100)
    stats = train.finetune(tiny_model, [str(corpora["train_de"])], tmp_path / "out", cfg, seq_len=32,
                           held_out={"de": corpora["eval_de"]})
    assert stats.eval_losses == {}


@pytest.mark.parametrize("extra, message", [
    (["--eval-text", "de={eval}"], "--eval-text needs --eval-steps N"),
    (["--eval-steps", "2"], "--eval-steps needs held-out text: pass --eval-text LANG=PATH"),
    (["--eval-steps", "2", "--eval-text", "de={tmp}/missing.txt"], "does not exist"),
])
def test_half_a_held_out_setting_is_a_one_line_error(tiny_model, corpora, tmp_path, capsys, extra, message):
    args = [a.format(eval=corpora["eval_de"], tmp=tmp_path) for a in extra]
    code = cli.main(["finetune", str(tiny_model), "--data", str(corpora["train_de"]), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and message in err[-1] and not (tmp_path / "out").exists()
