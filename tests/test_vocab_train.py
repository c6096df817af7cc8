"""An extended vocabulary in training: the new rows trained in stage 1 (old rows bit for bit), written back with the
layers, the chat vector on an extended model, and `elo run` with a `vocab` section end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEXT, VOCAB, save_tiny_model
from elo_cpt import chat_vector, checkpoint, cli, config, pipeline, surgery, train, vocabulary
from elo_cpt.config import TrainConfig
from elo_cpt.errors import EloError

ADD = 40
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in checkpoint.safetensors_files(model_dir) for name, tensor in load_file(shard).items()}


def korean_corpus(path: Path) -> Path:
    paragraphs = (TEXT / "ko.txt").read_text(encoding="utf-8").split("\n\n")
    path.write_text("".join(json.dumps({"text": f"{i}. {paragraphs[i % len(paragraphs)]}"}, ensure_ascii=False) + "\n"
                            for i in range(40)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """arch -> (base, extended model, Korean corpus): llama with a tied head, mistral with an untied one."""
    root = tmp_path_factory.mktemp("vocab-train")
    corpus = korean_corpus(root / "ko.jsonl")
    found = {}
    for arch in ("llama", "mistral"):
        base = save_tiny_model(root / f"base-{arch}", arch, num_layers=4)
        vocabulary.extend_vocabulary(base, [str(corpus)], ADD, root / f"ext-{arch}")
        found[arch] = (base, root / f"ext-{arch}", corpus)
    return found


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_stage1_trains_only_the_new_rows_and_merge_writes_them_back(extended, tmp_path, arch):
    base, ext, corpus = extended[arch]
    shallow, trained, merged = tmp_path / "shallow", tmp_path / "stage1", tmp_path / "merged"
    surgery.detach(ext, "0,-1", shallow)
    # weight decay and a large rate: AdamW's decoupled decay would shrink the old rows if they were decayed
    cfg = TrainConfig(tokens=640, lr=1e-2, weight_decay=0.5, batch_size=2, warmup_ratio=0.0, report_to=["none"])
    train.pretrain(shallow, [str(corpus)], trained, cfg, seq_len=32, train_new_rows=True)
    rows = [name for name in (EMBED, HEAD) if name in weights(ext)]
    assert rows == ([EMBED] if arch == "llama" else [EMBED, HEAD])
    before, after = weights(shallow), weights(trained)
    for name in rows:
        assert torch.equal(after[name][:VOCAB], before[name][:VOCAB])  # bit for bit
        assert not torch.equal(after[name][VOCAB:], before[name][VOCAB:])
    provenance = json.loads((trained / checkpoint.PROVENANCE).read_text())
    assert provenance["trained_rows"] == {name: [VOCAB, VOCAB + ADD] for name in rows}
    assert set(rows) <= set(provenance["trained_tensors"])
    surgery.merge(ext, trained, merged)
    old, new = weights(ext), weights(merged)
    assert set(new) == set(old)
    changed = {n for n in old if not torch.equal(old[n], new[n])}
    layers = {n for n in old if n.startswith(("model.layers.0.", "model.layers.3."))}
    assert changed == layers | set(rows)  # everything else byte-identical
    for name in rows:
        assert torch.equal(new[name][:VOCAB], old[name][:VOCAB]) and torch.equal(new[name][VOCAB:], after[name][VOCAB:])
    # the file itself: header and every byte outside the changed tensors' data as the base's
    before_file, after_file = (bytearray((folder / "model.safetensors").read_bytes()) for folder in (ext, merged))
    for start, end in (checkpoint.tensor_byte_ranges(ext / "model.safetensors")[n] for n in changed):
        before_file[start:end] = after_file[start:end] = bytes(end - start)
    assert before_file == after_file


def test_new_rows_train_at_their_own_rate_in_a_group_of_their_own(extended, tmp_path):
    """stage1.new_rows_lr: the embedding and the untied head in optimizer groups of their own at that rate (no
    weight decay), with Trainer's optimizer and with step_in_backward's per-parameter ones."""
    from transformers import TrainingArguments

    from elo_cpt.backward_step import StepInBackward
    from elo_cpt.engine import EloTrainer

    _, ext, _ = extended["mistral"]
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to="none", use_cpu=True)
    for custom in (None, (StepInBackward, {"inner": (torch.optim.AdamW, {"lr": 1e-3})})):
        model = checkpoint.load_model(ext, torch.float32)
        train.train_only_layers(model, [0])
        names = train.train_rows_from(model, VOCAB, lr=0.25)
        params = dict(model.named_parameters())
        optimizer = EloTrainer(model=model, args=args, optimizer_cls_and_kwargs=custom).create_optimizer()
        own = [group for group in optimizer.param_groups if group["lr"] == 0.25]
        assert [group["params"] for group in own] == [[params[name]] for name in names] == [[params[EMBED]], [params[HEAD]]]
        assert all(group["weight_decay"] == 0.0 for group in own)
        layers = [p for group in optimizer.param_groups if group["lr"] == 1e-3 for p in group["params"]]
        assert len(layers) == sum(p.requires_grad for p in model.parameters()) - 2
        if custom is not None:
            assert isinstance(optimizer, StepInBackward) and optimizer.inner[params[HEAD]].param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_new_rows_lr_moves_the_new_rows_further_and_the_old_ones_not_at_all(extended, tmp_path, arch):
    _, ext, corpus = extended[arch]
    surgery.detach(ext, "0,-1", tmp_path / "shallow")
    cfg = TrainConfig(tokens=640, lr=1e-4, weight_decay=0.5, batch_size=2, warmup_ratio=0.0, report_to=["none"])
    moved = {}
    for lr in (None, 1e-2):
        out = tmp_path / f"stage1-{lr}"
        train.pretrain(tmp_path / "shallow", [str(corpus)], out, cfg, seq_len=32, train_new_rows=True, new_rows_lr=lr)
        before, after = weights(tmp_path / "shallow"), weights(out)
        assert torch.equal(after[EMBED][:VOCAB], before[EMBED][:VOCAB])  # bit for bit, at any rate
        if HEAD in after:
            assert torch.equal(after[HEAD][:VOCAB], before[HEAD][:VOCAB])
        moved[lr] = (after[EMBED][VOCAB:] - before[EMBED][VOCAB:]).abs().mean().item()
        assert json.loads((out / checkpoint.PROVENANCE).read_text())["new_rows_lr"] == (lr or 1e-4)
    assert moved[1e-2] > 10 * moved[None] > 0


def test_bf16_model_with_norm_and_new_rows_merges(tmp_path):
    """A bf16 checkpoint (as SmolLM2's) trained in fp32: the digests of the norm and the rows are the base's own, so
    merge accepts it (the norm's digest used to be taken of the fp32 copy, and merge refused the model's own base)."""
    base = save_tiny_model(tmp_path / "base", "llama", num_layers=3)
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    ext = tmp_path / "ext"
    vocabulary.extend_vocabulary(base, [str(korean_corpus(tmp_path / "ko.jsonl"))], ADD, ext)
    surgery.detach(ext, "0", tmp_path / "shallow")
    cfg = TrainConfig(tokens=128, lr=1e-2, batch_size=2, report_to=["none"])
    train.pretrain(tmp_path / "shallow", [str(tmp_path / "ko.jsonl")], tmp_path / "stage1", cfg, seq_len=32,
                   train_norm=True, train_new_rows=True)
    surgery.merge(ext, tmp_path / "stage1", tmp_path / "merged")
    old, new = weights(ext), weights(tmp_path / "merged")
    assert new[EMBED].dtype == torch.bfloat16 and torch.equal(new[EMBED][:VOCAB], old[EMBED][:VOCAB])
    assert not torch.equal(new["model.norm.weight"], old["model.norm.weight"])


def test_train_new_rows_needs_an_extended_model(extended, tmp_path, capsys):
    base, ext, corpus = extended["llama"]
    surgery.detach(base, "0", tmp_path / "shallow")
    with pytest.raises(EloError, match="has no elo_vocab.json; extend it with elo vocab first"):
        train.pretrain(tmp_path / "shallow", [str(corpus)], tmp_path / "out", TrainConfig(tokens=64), seq_len=32,
                       train_new_rows=True)
    surgery.detach(ext, "0", tmp_path / "ext-shallow")
    assert cli.main(["pretrain", str(tmp_path / "ext-shallow"), "--data", str(corpus), "--out", str(tmp_path / "s1"),
                     "--tokens", "64", "--seq-len", "32", "--batch-size", "2", "--train-new-rows"]) == 0
    assert json.loads((tmp_path / "s1" / checkpoint.PROVENANCE).read_text())["trained_rows"] == {EMBED: [VOCAB, VOCAB + ADD]}
    assert cli.main(["pretrain", str(tmp_path / "ext-shallow"), "--data", str(corpus), "--out", str(tmp_path / "s2"),
                     "--tokens", "64", "--seq-len", "32", "--new-rows-lr", "1e-3"]) == 1
    assert "--new-rows-lr is the learning rate of the rows --train-new-rows trains" in capsys.readouterr().err


def test_chat_vector_on_an_extended_model(extended, tmp_path):
    """Target extended by elo vocab, base and instruct with the old vocabulary: the vector on the shared rows, the new
    rows and the extended tokenizer kept."""
    base, ext, _ = extended["mistral"]
    instruct = save_tiny_model(tmp_path / "instruct", "mistral", num_layers=4, seed=1)
    out = chat_vector(ext, base, instruct, tmp_path / "out")
    b, i, t, o = weights(base), weights(instruct), weights(ext), weights(out)
    for name in (EMBED, HEAD):
        assert torch.allclose(o[name][:VOCAB], t[name][:VOCAB] + i[name] - b[name])
        assert torch.equal(o[name][VOCAB:], t[name][VOCAB:])
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(ext))


def test_run_with_vocab_extension(extended, tmp_path, monkeypatch):
    base, _, corpus = extended["llama"]
    run = tmp_path / "run"
    cfg = config.load_config(None, [
        f"model={base}", "target_language=ko", f"data.target=[{corpus}]", "data.english_share=0",
        f"data.eval={{ko: {TEXT / 'ko.txt'}, en: {TEXT / 'en.txt'}}}", "seq_len=32", "stage1.tokens=640",
        "stage1.batch_size=2", "stage1.lr=1e-3", "align.batch_size=2", "align.token_ratio=0.2", "eval.max_chars=1000",
        f"vocab.add={ADD}", "stage1.train_new_rows=true", "eval.sample_tokens=0"])
    metrics = pipeline.run(cfg, run)
    vocab = metrics["vocab"]
    assert vocab["added"] == ADD and vocab["first_new_id"] == VOCAB and "new_tokens" not in vocab
    held_out = vocab["held_out_tokens_per_char"]
    assert held_out["ko"]["after"] < held_out["ko"]["before"] and held_out["en"]["after"] == held_out["en"]["before"]
    assert len(AutoTokenizer.from_pretrained(run / "model")) == len(AutoTokenizer.from_pretrained(base)) + ADD
    final = weights(run / "model")[EMBED]
    assert final.shape[0] == VOCAB + ADD
    assert "vocab" in metrics["stages"] and metrics["eval"]["base"] != metrics["eval"]["final"]
    assert f"The vocabulary was extended by {ADD} tokens before stage 1" in (run / "report.md").read_text()
    assert json.loads((run / "stages" / "stage1" / checkpoint.PROVENANCE).read_text())["trained_rows"] == {EMBED: [VOCAB, VOCAB + ADD]}
    # the merged model: the base's old rows bit for bit (the alignment trains them all afterwards)
    assert torch.equal(weights(run / "stages" / "merged")[EMBED][:VOCAB], weights(run / "stages" / "vocab")[EMBED][:VOCAB])
    # a resumed run does not extend the vocabulary again
    monkeypatch.setattr(vocabulary, "extend_vocabulary", lambda *a, **k: pytest.fail("extended again"))
    (run / "metrics.json").unlink()
    again = pipeline.run(cfg, run)
    assert again["vocab"] == vocab and again["eval"] == metrics["eval"]


def test_vocab_settings_are_checked(tmp_path):
    with pytest.raises(EloError, match="vocab.add must be"):
        config.load_config(None, ["vocab.add=-1"])
    cfg = config.load_config(None, [f"model={tmp_path}", f"data.target=[{tmp_path / 'x.txt'}]", "data.english_share=0",
                                    f"data.eval={{ko: {TEXT / 'ko.txt'}}}", "vocab.add=8"])
    with pytest.raises(EloError, match="vocab.add with your own corpora needs stage1.tokens"):
        pipeline.resolve_defaults(cfg)
    with pytest.raises(EloError, match="stage1.new_rows_lr must be positive"):
        config.load_config(None, ["stage1.train_new_rows=true", "stage1.new_rows_lr=0"])
    with pytest.raises(EloError, match="set stage1.train_new_rows=true, or leave stage1.new_rows_lr unset"):
        config.load_config(None, ["stage1.new_rows_lr=1e-4"])
    assert config.load_config(None, ["stage1.train_new_rows=true", "stage1.new_rows_lr=1.5e-4"]).stage1.new_rows_lr == 1.5e-4
