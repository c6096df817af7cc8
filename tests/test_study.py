"""`elo study` on a tiny model: every method, both budgets, shared stage 1, resume, and bad study files."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import free_port
from elo_cpt import costmodel
from elo_cpt import study_runner as study
from elo_cpt.cli import main
from elo_cpt.errors import EloError


def tiny_study(tiny_model, corpora, cells):
    return {
        "run": {
            "model": str(tiny_model),
            "data": {"target": [str(corpora["train_de"])], "english": [str(corpora["train_en"])],
                     "eval": {"de": str(corpora["eval_de"]), "en": str(corpora["eval_en"])}},
            "seq_len": 32, "stage1": {"tokens": 1280, "lr": 1e-3, "batch_size": 2, "bridge_tokens": 0},
            "align": {"lr": 1e-3, "batch_size": 2, "token_ratio": 0.25},
            "eval": {"max_chars": 2000, "sample_tokens": 0},
        },
        "cells": cells,
    }


CELLS = [
    {"name": "base", "method": "base"},
    {"name": "elo", "method": "elo"},
    {"name": "align-only", "method": "control"},
    {"name": "fft-flops", "method": "fft", "budget": "flops"},
    {"name": "lora-tokens", "method": "lora", "budget": "tokens"},
    {"name": "freeze-flops", "method": "freeze", "budget": "flops"},
    {"name": "no-align", "method": "elo", "group": "alignment budget", "set": {"align.token_ratio": 0.0}},
    {"name": "emulator-norm", "method": "elo", "group": "options",
     "set": {"stage1.frozen_layers": "2", "stage1.train_norm": True, "stage1.bridge_tokens": "auto", "align.method": "freeze"}},
]


def test_study_runs_every_method_and_resumes(tiny_model, corpora, tmp_path):
    spec = tiny_study(tiny_model, corpora, CELLS)
    out = tmp_path / "study"
    results = study.study(spec, out)
    cells = {c["name"]: c for c in results["cells"]}
    assert set(cells) == {c["name"] for c in CELLS} and not any(c.get("missing") for c in cells.values())
    # Budgets: ELO trains stage 1 + 25% alignment; equal tokens matches that, equal FLOPs matches its cost.
    assert cells["elo"]["tokens"] == 1280 + 320 and cells["lora-tokens"]["tokens"] == 1600
    assert cells["align-only"]["tokens"] == 320
    for name in ("fft-flops", "freeze-flops"):
        # Whole sequences, as many as ELO's FLOPs pay for: within one sequence's cost below ELO's.
        per_sequence = cells[name]["flops"] / cells[name]["tokens"] * 32
        assert cells["elo"]["flops"] - per_sequence < cells[name]["flops"] <= cells["elo"]["flops"]
    assert (cells["fft-flops"]["tokens"], cells["freeze-flops"]["tokens"]) == (896, 1152)  # 28 and 36 sequences
    # Bridges cost one forward pass of the full model over their calibration tokens (auto: 4,096, capped at stage
    # 1's 1,280), on top of the stage-1 layers.
    assert cells["emulator-norm"]["flops"] > cells["elo"]["flops"]
    # The alignment-budget cell shares the ELO cell's stage 1: one stage-1 folder for the two.
    assert len(list((out / "stage1").iterdir())) == 2
    assert cells["no-align"]["eval"]["final"] == cells["no-align"]["eval"]["merged"] == cells["elo"]["eval"]["merged"]
    assert cells["elo"]["eval"]["final"] != cells["elo"]["eval"]["merged"]
    for cell in cells.values():
        assert set(cell["eval"]["final"]) == {"de", "en"}
        assert not (out / "cells" / cell["name"] / "model").exists()  # deleted once evaluated
    assert cells["base"]["tokens"] == 0 and cells["elo"]["peak_rss_bytes"] > 0
    assert cells["elo"]["resumes"] == 0 and cells["elo"]["stages"]["stage1"]["resumes"] == 0
    # The results table has a row per cell and the plot exists.
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in cells) and "## alignment budget" in table
    assert (out / "results.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text()) == results
    # A rerun keeps finished cells: their results are not rewritten.
    stamp = (out / "cells" / "elo" / study.RESULT).stat().st_mtime_ns
    assert study.study(spec, out)["cells"] == results["cells"]
    assert (out / "cells" / "elo" / study.RESULT).stat().st_mtime_ns == stamp
    # A cell changed under the same name is refused before anything runs.
    changed = tiny_study(tiny_model, corpora, [{"name": "elo", "method": "elo", "set": {"stage1.lr": 1e-4}}])
    with pytest.raises(EloError, match="other settings"):
        study.study(changed, out)
    # So is a changed `run` section (or default) under an unchanged cell, naming the setting...
    spec["run"]["stage1"]["lr"] = 5e-4
    with pytest.raises(EloError, match=r"cell elo with other settings \(stage1.lr: 0.001 -> 0.0005\)"):
        study.study(spec, out, "elo")
    # ...but not one that cannot change the numbers.
    spec["run"]["stage1"]["lr"] = 1e-3
    spec["run"]["eval"]["sample_tokens"] = 8
    assert study.study(spec, out)["cells"] == results["cells"]


def test_results_table_says_which_cells_were_resumed():
    from elo_cpt import study_report

    def cell(name, resumes=None):
        return {"name": name, "method": "elo", "group": None, "tokens": 1600, "flops": 2e12, "train_seconds": 84.4,
                "peak_rss_bytes": 2**30, "eval": {"final": {"de": 1.7, "en": 1.0}}, "note": "",
                **({} if resumes is None else {"resumes": resumes})}

    results = {"target_language": "de", "cells": [cell("old"), cell("straight", 0), cell("resumed", 2)]}
    (_, table), = study_report.rows(results)
    assert [row[5] for row in table] == ["84", "84", "84 (2 resumed)"]
    assert [row[3] for row in table] == ["-", "-", "-"]  # run before characters were counted
    results["cells"][0]["characters"] = 4000
    assert study_report.rows(results)[0][1][0][2:4] == ["1,600", "4,000"]
    results["cells"][0]["note"] = "lr 1e-5 | no replay"
    results["model"], results["machine"] = "m", {"cpu_count": 2, "platform": "p", "torch": "t", "date_utc": "d"}
    assert "lr 1e-5 \\| no replay |" in study_report.markdown(results)  # a | in a note does not split the row


def test_emulator_layers_stay_frozen_and_norm_is_written_back(tiny_model, corpora, tmp_path):
    """A frozen emulator layer is computed in stage 1 but neither trained nor merged; a trained norm is merged."""
    from safetensors.torch import load_file

    from elo_cpt import surgery, train

    shallow = surgery.detach(tiny_model, "0,-1", tmp_path / "shallow", frozen_layers="2")
    trained = tmp_path / "stage1"
    cfg = train.TrainConfig(tokens=320, lr=1e-2, batch_size=2)
    train.pretrain(shallow, [str(corpora["train_de"])], trained, cfg, seq_len=32, train_norm=True)
    before, after = load_file(shallow / "model.safetensors"), load_file(trained / "model.safetensors")
    assert any(k.startswith("model.layers.1.") for k in after)  # the emulator layer (base layer 2) is in the model
    assert all((before[k] == after[k]).all() for k in after if k.startswith("model.layers.1."))
    assert not (before["model.norm.weight"] == after["model.norm.weight"]).all()
    merged = surgery.merge(tiny_model, trained, tmp_path / "merged")
    base, out = load_file(tiny_model / "model.safetensors"), load_file(merged / "model.safetensors")
    assert (out["model.norm.weight"] == after["model.norm.weight"]).all()
    assert not (out["model.layers.4.mlp.up_proj.weight"] == base["model.layers.4.mlp.up_proj.weight"]).all()
    for name in base:
        if not name.startswith(("model.layers.0.", "model.layers.4.", "model.norm.")):
            assert (out[name] == base[name]).all(), name
    with pytest.raises(EloError, match="both trained and frozen"):
        surgery.detach(tiny_model, "0,-1", tmp_path / "bad", frozen_layers="0")


def test_emulator_cost_counts_the_frozen_layers():
    shape = costmodel.Shape(num_layers=8, hidden=64, intermediate=128, heads=4, kv_heads=4, head_dim=16, vocab=100, tied=True)
    plain = costmodel.step_cost(shape, "elo", [0, 7])
    emulated = costmodel.step_cost(shape, "elo", [0, 7], frozen=[3])
    # One more layer, computed forward and backward (gradients flow through it) but without weight gradients.
    assert emulated.flops_per_token - plain.flops_per_token == pytest.approx(4 * shape.layer_params)
    assert emulated.trainable_params == plain.trainable_params and emulated.computed_layers == 3


@pytest.mark.parametrize("cells, message", [
    ([{"name": "a", "method": "magic"}], "unknown method"),
    ([{"name": "a", "method": "fft"}], "no cell named 'elo'"),
    ([{"name": "elo", "method": "base"}, {"name": "b", "method": "fft"}], "must be an elo cell"),
    ([{"name": "elo", "method": "elo"}, {"name": "elo", "method": "elo"}], "unique"),
    ([{"name": "elo", "method": "elo", "set": {"stage1.lrr": 1}}], "unknown config key 'stage1.lrr'"),
    ([{"name": "a/b", "method": "elo"}], "names a folder"),
    ([{"name": "elo", "method": "elo", "budget": "hours"}], "budget"),
    ([{"name": "elo"}], "give name and method"),
    ([{"name": "elo", "method": "elo", "set": {"vocab.add": 8}}, {"name": "c", "method": "control"}],
     r"a control repeats the alignment of elo from the model it starts from, so its vocab.\* settings must be elo's"),
    ([{"name": "elo", "method": "elo", "set": {"sft.data": ["chats.jsonl"]}}], "sft.data is not supported in a study"),
])
def test_bad_study_files_fail_with_a_clear_error(tiny_model, corpora, tmp_path, cells, message):
    with pytest.raises(EloError, match=message):
        study.study(tiny_study(tiny_model, corpora, cells), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_lists_the_cells_and_the_builtin_german_study(tiny_model, corpora, tmp_path, capsys):
    # Planned only, nothing trains: a budget large enough that the FLOPs show at one decimal of a TFLOP.
    spec = tiny_study(tiny_model, corpora, CELLS)
    spec["run"]["stage1"]["tokens"] = 64_000_000
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    files = sorted(tmp_path.rglob("*"))
    assert main(["study", str(tmp_path / "study.yaml"), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "base\tbase\t-\t0 tokens\t0.0 TFLOPs",
        "elo\telo\t-\t80,000,000 tokens\t15.8 TFLOPs",  # 64M stage-1 tokens + 25% alignment
        "align-only\tcontrol\t-\t16,000,000 tokens\t5.6 TFLOPs",
        "fft-flops\tfft\t-\t45,192,960 tokens\t15.8 TFLOPs",  # whole sequences of 32 at ELO's FLOPs
        "lora-tokens\tlora\t-\t80,000,000 tokens\t38.3 TFLOPs",
        "freeze-flops\tfreeze\t-\t58,545,440 tokens\t15.8 TFLOPs",
        "no-align\telo\talignment budget\t64,000,000 tokens\t10.2 TFLOPs",
        "emulator-norm\telo\toptions\t80,000,000 tokens\t16.9 TFLOPs",  # + the frozen layer and the bridges' pass
    ]
    assert sorted(tmp_path.rglob("*")) == files  # listing writes nothing
    assert main(["study", "nope", "--list"]) == 1
    assert "built-in study (de" in capsys.readouterr().err
    assert main(["study", "de"]) == 1
    assert "needs --out" in capsys.readouterr().err
    assert "de" in study.builtin_studies()
    parsed = study.load_study("de")
    assert {"base", "elo", "align-only", "fft-flops", "fft-tokens"} <= {c.name for c in parsed.cells}


def test_bridges_bring_the_shallow_model_closer_to_the_full_one(tiny_model, corpora, tmp_path, tokenizer, capsys):
    """A least-squares bridge for the removed middle makes the shallow model's logits closer to the full model's, is
    applied in stage 1, and is never trained, saved with the layers or merged."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from elo_cpt import checkpoint, data, surgery, train

    rows = data.load_training_data([str(corpora["train_de"])], tokenizer, seq_len=32, n_tokens=1024, cache_dir=None)
    ids = torch.stack([rows[i]["input_ids"] for i in range(len(rows))])
    shallow = surgery.detach(tiny_model, "0,-1", tmp_path / "shallow")
    assert surgery.bridge_gaps([0, 4], 5) == [(0, 4)] and surgery.bridge_gaps([1, 2], 5) == [(-1, 1), (2, 5)]
    full = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    plain = checkpoint.load_model(shallow).eval()
    with torch.no_grad():
        target = full(ids).logits
        error_plain = (plain(ids).logits - target).pow(2).mean()
        surgery.add_bridges(tiny_model, shallow, ids)
        bridged = checkpoint.load_model(shallow).eval()
        assert surgery.apply_bridges(bridged, shallow) == 1
        error_bridged = (bridged(ids).logits - target).pow(2).mean()
    assert error_bridged < 0.8 * error_plain, (error_bridged, error_plain)
    assert "warning" not in capsys.readouterr().err
    surgery.fit_bridges(tiny_model, [0, 4], ids[:2])  # 64 tokens for 33 unknowns per output
    assert "under 4x the hidden size" in capsys.readouterr().err
    bridges = load_file(shallow / surgery.BRIDGE_FILE)
    assert set(bridges) == {"0->4"} and bridges["0->4"].shape == (33, 32)
    trained = tmp_path / "stage1"
    train.pretrain(shallow, [str(corpora["train_de"])], trained, train.TrainConfig(tokens=320, lr=1e-2, batch_size=2), seq_len=32)
    # Not trained: the shallow model's bridges are as fitted; not saved: the trained folder has none.
    assert all(torch.equal(t, bridges[k]) for k, t in load_file(shallow / surgery.BRIDGE_FILE).items())
    after = load_file(trained / "model.safetensors")
    assert not any("bridge" in name for name in after) and not (trained / surgery.BRIDGE_FILE).exists()
    # Not merged: the merged model holds the base's tensors, with the two trained layers back in their places.
    merged_dir = surgery.merge(tiny_model, trained, tmp_path / "merged")
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    assert merged.keys() == base.keys() and not (merged_dir / surgery.BRIDGE_FILE).exists()
    own = {"model.layers.0.": "model.layers.0.", "model.layers.4.": "model.layers.1."}  # base prefix -> shallow prefix
    for name, tensor in merged.items():
        prefix = next((p for p in own if name.startswith(p)), None)
        expected = after[own[prefix] + name.removeprefix(prefix)] if prefix else base[name]
        assert torch.equal(tensor, expected), name


def test_study_cells_train_on_two_processes(tiny_model, corpora, tmp_path):
    """`--launch torchrun`: every cell trains on two processes (gloo), with the global batch of one process. Bits/char
    agree to 5e-3 (0.1%): under DDP the trainable head of full fine-tuning turns the chunked loss off, and float
    differences grow over steps at lr 1e-3."""
    import sys

    cells = [{"name": "elo", "method": "elo"}, {"name": "fft-flops", "method": "fft", "budget": "flops"}]
    one = tiny_study(tiny_model, corpora, cells)
    one["run"]["stage1"]["batch_size"] = one["run"]["align"]["batch_size"] = 4
    two = tiny_study(tiny_model, corpora, cells)
    two["run"]["stage1"]["batch_size"] = two["run"]["align"]["batch_size"] = 2
    single = study.study(one, tmp_path / "one")
    launch = f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port {free_port()}"
    double = study.study(two, tmp_path / "two", launch=launch)
    for a, b in zip(single["cells"], double["cells"], strict=True):
        assert a["tokens"] == b["tokens"] and all(s["processes"] == 2 for s in b["stages"].values())
        for lang, value in a["eval"]["final"].items():
            assert b["eval"]["final"][lang] == pytest.approx(value, abs=5e-3)
    with pytest.raises(EloError, match="run it in one process and give --launch"):
        import os

        os.environ["WORLD_SIZE"] = "2"
        try:
            study.study(two, tmp_path / "three")
        finally:
            del os.environ["WORLD_SIZE"]


VOCAB_ADD = 40
VOCAB_CELLS = [
    {"name": "base", "method": "base"},
    {"name": "vocab-base", "method": "base", "set": {"vocab.add": VOCAB_ADD}},
    {"name": "vocab-elo", "method": "elo", "set": {"vocab.add": VOCAB_ADD, "stage1.train_new_rows": True, "stage1.new_rows_lr": 1e-2}},
    {"name": "vocab-control", "method": "control", "reference": "vocab-elo", "set": {"vocab.add": VOCAB_ADD}},
    {"name": "vocab-fft", "method": "fft", "budget": "flops", "reference": "vocab-elo", "set": {"vocab.add": VOCAB_ADD}},
]


def korean_study(tiny_model, corpora, tmp_path, cells):
    from conftest import TEXT

    paragraphs = (TEXT / "ko.txt").read_text(encoding="utf-8").split("\n\n")
    korean = tmp_path / "train_ko.jsonl"
    korean.write_text("".join(json.dumps({"text": f"{i}. {paragraphs[i % len(paragraphs)]}"}, ensure_ascii=False) + "\n"
                              for i in range(40)), encoding="utf-8")
    spec = tiny_study(tiny_model, corpora, cells)
    spec["run"]["target_language"] = "ko"
    spec["run"]["data"].update(target=[str(korean)], eval={"ko": str(TEXT / "ko.txt"), "en": str(corpora["eval_en"])})
    return spec


def test_vocab_cells_share_one_extension_and_count_characters(tiny_model, corpora, tmp_path):
    from conftest import VOCAB

    out = tmp_path / "study"
    results = study.study(korean_study(tiny_model, corpora, tmp_path, VOCAB_CELLS), out)
    cells = {c["name"]: c for c in results["cells"]}
    assert not any(c.get("missing") for c in cells.values())
    # one extension, built by the first cell that needed it and shared (a second build would refuse its folder)
    (extension,) = (out / "vocab").iterdir()
    assert json.loads((extension / "settings.json").read_text())["add"] == VOCAB_ADD
    (stage1,) = (out / "stage1").iterdir()
    assert json.loads((stage1 / "settings.json").read_text())["vocab"]["add"] == VOCAB_ADD  # in the share key
    assert json.loads((stage1 / "stage1" / "elo_provenance.json").read_text())["new_rows_lr"] == 1e-2
    for name in ("vocab-base", "vocab-elo", "vocab-control", "vocab-fft"):
        vocab = cells[name]["vocab"]
        assert vocab["added"] == VOCAB_ADD and vocab["vocab_size"] == VOCAB + VOCAB_ADD
        assert vocab["tokens_per_char_after"] < vocab["tokens_per_char_before"]
        # held-out text in the extended tokenizer: fewer Korean tokens, the same English ones
        assert cells[name]["eval_tokens_per_char"]["ko"] < cells["base"]["eval_tokens_per_char"]["ko"]
        assert cells[name]["eval_tokens_per_char"]["en"] == cells["base"]["eval_tokens_per_char"]["en"]
    assert cells["base"]["vocab"] is None and cells["vocab-base"]["eval"] != cells["base"]["eval"]
    # characters: each stage's tokens over its mixture's tokens per character
    elo = cells["vocab-elo"]
    assert set(elo["stages"]) == {"stage1", "align"} and elo["tokens"] == 1280 + 320
    for stage in elo["stages"].values():
        assert stage["characters"] == round(stage["tokens"] / stage["tokens_per_char"])
    assert elo["characters"] == sum(s["characters"] for s in elo["stages"].values())
    assert cells["vocab-control"]["tokens"] == 320 and cells["vocab-control"]["characters"] > 0
    assert cells["base"]["characters"] == 0
    assert "| training chars |" in (out / "results.md").read_text()
    # the budgets: the larger head, and training the new rows (the head's weight gradient over stage 1's tokens)
    parsed = study.load_study(korean_study(tiny_model, corpora, tmp_path, VOCAB_CELLS + [
        {"name": "plain-elo", "method": "elo"},
        {"name": "vocab-no-rows", "method": "elo", "set": {"vocab.add": VOCAB_ADD}}]))
    flops = {name: study.plan(parsed, parsed.cell(name))["flops"] for name in ("plain-elo", "vocab-no-rows", "vocab-elo")}
    assert flops["plain-elo"] < flops["vocab-no-rows"] < flops["vocab-elo"]
    assert flops["vocab-elo"] - flops["vocab-no-rows"] == pytest.approx(1280 * 2 * (VOCAB + VOCAB_ADD) * 32)
