"""The run report: forgetting numbers, the HTML and Markdown pages, and the page as a real browser renders it."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from elo_cpt import report
from elo_cpt.errors import EloError

ROOT = Path(__file__).resolve().parents[1]


def _losses(steps: int, start: float, end: float) -> list[list[float]]:
    return [[s, round(start + (end - start) * (s / steps) ** 0.5, 4)] for s in range(1, steps + 1)]


def make_metrics(english_final: float = 0.9917, baseline: bool = True) -> dict:
    """metrics.json as the pipeline writes it (numbers from the README's measured default run), plus a baseline."""
    def lm(bpc_de: float, bpc_en: float) -> dict:
        return {"de": {"bits_per_char": bpc_de, "bits_per_byte": bpc_de / 1.03, "chars": 19990, "tokens": 7100},
                "en": {"bits_per_char": bpc_en, "bits_per_byte": bpc_en / 1.001, "chars": 19985, "tokens": 4500}}

    def training(tokens: int, seconds: float, params: int, steps: int, start: float, end: float) -> dict:
        return {"steps": steps, "tokens": tokens, "seconds": seconds, "trainable_params": params, "final_loss": end,
                "peak_rss_bytes": 2_400_000_000, "losses": _losses(steps, start, end)}

    metrics = {
        "config": {"model": "/cache/elo-cpt/smollm2-135m-instruct", "layers": "0,-1", "target_language": "de", "seq_len": 256,
                   "seed": 0, "data": {"target": ["/cache/de.jsonl"], "english": ["/cache/en.jsonl"], "english_share": 0.1},
                   "stage1": {"tokens": 160000, "lr": 1.5e-05}, "align": {"token_ratio": 0.1, "lr": 5e-05},
                   "eval": {"max_chars": 20000, "batch_size": 8, "tasks": ["elo_tiny_mc"], "english_tolerance_pct": 1.0}},
        "data": {"stage1": {"documents": 812, "tokens": 160000, "byte_share": {"de": 0.9, "en": 0.1}},
                 "align": {"documents": 90, "tokens": 15872, "byte_share": {"de": 0.9, "en": 0.1}}},
        "stages": {
            "detach": {"seconds": 1.7},
            "stage1": {"seconds": 324.5, "training": training(160000, 320.1, 7_080_192, 156, 3.4, 2.9)},
            "merge": {"seconds": 1.6},
            "align": {"seconds": 178.2, "training": training(15872, 176.0, 134_515_008, 15, 2.9, 2.6)},
            "eval base": {"seconds": 46.1}, "eval merged": {"seconds": 46.5}, "eval final": {"seconds": 46.8},
        },
        "eval": {"base": lm(1.8953, 1.0053), "merged": lm(1.9058, 1.0042), "final": lm(1.7892, english_final)},
        "samples": {
            name: {"de": [{"prompt": "Die Hauptstadt von Deutschland ist", "completion": f" Berlin <{name}> & mehr.\nZweite Zeile | Pipe"}],
                   "en": [{"prompt": "The capital of France is", "completion": f" Paris ({name})."}]}
            for name in ("base", "merged", "final")
        },
        "lm_eval": {
            name: {"elo_tiny_mc": {"metrics": {"acc": acc, "acc_norm": acc}, "stderr": {"acc": 0.18, "acc_norm": 0.18},
                                   "samples": 8, "higher_is_better": {"acc": True, "acc_norm": True}, "version": 1.0}}
            for name, acc in (("base", 0.375), ("final", 0.5))
        },
        "total_seconds": 645.4,
    }
    if baseline:
        metrics["eval"]["baseline_fft"] = lm(1.7701, 1.0190)
        metrics["baselines"] = {"fft": {"method": "fft", "seconds": 890.0,
                                        "training": training(176000, 880.0, 134_515_008, 171, 3.4, 2.7)}}
    return metrics


def write_run(folder: Path, metrics: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def test_forgetting_against_base_and_baseline():
    rows = {(r["language"], r["reference"]): r for r in report.forgetting(make_metrics(english_final=1.03))}
    english = rows[("en", "base")]
    assert english["change"] == pytest.approx(1.03 - 1.0053)
    assert english["change_pct"] == pytest.approx(100 * (1.03 - 1.0053) / 1.0053)
    assert english["flag"] and "English (en)" in english["message"] and "2.5% worse" in english["message"]
    assert rows[("en", "baseline_fft")]["flag"]  # 1.0190 -> 1.03 is 1.08% worse, over the 1% tolerance
    # The target language is not forgetting: worse than the baseline is reported, not flagged.
    assert rows[("de", "baseline_fft")]["verdict"] == "worse" and not rows[("de", "baseline_fft")]["flag"]
    assert rows[("de", "base")]["change"] == pytest.approx(1.7892 - 1.8953) and rows[("de", "base")]["verdict"] == "better"
    # Within tolerance, or better: no flag. Without a baseline, only the base model is a reference.
    relaxed = make_metrics(english_final=1.0150, baseline=False)
    assert not any(r["flag"] for r in report.forgetting(relaxed))
    relaxed["config"]["eval"]["english_tolerance_pct"] = 0.5
    assert [r["language"] for r in report.forgetting(relaxed) if r["flag"]] == ["en"]
    assert {r["reference"] for r in report.forgetting(relaxed)} == {"base"}


def test_report_pages_are_self_contained_and_escape_model_output(tmp_path):
    run = write_run(tmp_path / "run", make_metrics(english_final=1.03))
    html_path, md_path = report.write_report(run)
    page = html_path.read_text()
    # One file: every image inline, nothing fetched from anywhere.
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # Model output is text, never markup.
    assert "&lt;final&gt; &amp; mehr." in page and "<final>" not in page
    for text in ("baseline fft", "forgetting: English (en) bits/char of the final model is 2.5% worse", "elo_tiny_mc",
                 "+0.1250", "Die Hauptstadt von Deutschland ist", "english_tolerance_pct: 1.0", "645 s (10.8 min)"):
        assert text in page, text
    markdown = md_path.read_text()
    figures = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+)\)", markdown)
    assert len(figures) == 3 and all((run / f).read_bytes().startswith(b"\x89PNG") for f in figures)
    assert "| baseline fft | **1.7701** |" in markdown and "Berlin &lt;final&gt; &amp; mehr.<br>Zweite Zeile \\| Pipe" in markdown
    assert not list(run.rglob("*.tmp"))
    # Rewriting replaces the pages; a plot that no longer applies (no training curves) is removed.
    metrics = make_metrics(baseline=False)
    for stage in metrics["stages"].values():
        stage.pop("training", None)
    write_run(run, metrics)
    report.write_report(run)
    assert sorted(p.name for p in (run / "report_files").iterdir()) == ["bits_per_char.png", "time_and_tokens.png"]
    assert "baseline fft" not in html_path.read_text() and "forgetting:" not in html_path.read_text()


def test_resumed_stages_are_shown_with_the_time_of_every_invocation():
    metrics = make_metrics(baseline=False)
    assert "resumes" not in report.summary(metrics).splitlines()[-1] and "resume" not in report.headline(metrics)[-1]["detail"]
    metrics["stages"]["stage1"]["training"]["resumes"] = 2
    metrics["stages"]["align"]["training"]["resumes"] = 0
    metrics["this_invocation_seconds"] = 210.3
    table = report.cost_table(metrics)
    assert table["header"][-1] == "resumes"
    assert {row["cells"][0]["text"]: row["cells"][-1]["text"] for row in table["rows"]} == {
        "detach": "", "ELO stage 1": "2", "merge": "", "alignment": "0", "eval base": "", "eval merged": "", "eval final": "",
        "total (this run)": ""}
    assert report.summary(metrics).endswith("total 645 s over every invocation (resumed: ELO stage 1 2x; this invocation 210 s)")
    assert report.headline(metrics)[-1]["detail"] == "175,872 tokens trained; 2 resumes, every invocation counted"


def test_bad_run_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(EloError, match="does not exist"):
        report.write_report(tmp_path / "missing")
    with pytest.raises(EloError, match="has no metrics.json"):
        report.write_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(EloError, match="not valid JSON") as err:
        report.write_report(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report.html").exists()


def test_elo_report_command(tmp_path):
    run = write_run(tmp_path / "run", make_metrics())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "elo_cpt.cli", "report", str(run)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(run / "report.html"), str(run / "report.md")]
    failed = subprocess.run([sys.executable, "-m", "elo_cpt.cli", "report", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [f"elo: error: run folder {tmp_path / 'nope'} does not exist; pass the --out folder of an `elo run`"]


def test_figures_leave_the_callers_matplotlib_alone(tmp_path):
    """The loss plot of a stage and a study's plot draw on their own canvas: a process that imports elo_cpt keeps its
    matplotlib backend, and pyplot is never imported."""
    script = """if True:
        import sys
        from pathlib import Path
        import matplotlib
        from elo_cpt import engine, study_report
        out = Path(sys.argv[1])
        engine.save_loss_plot([(1, 3.0), (2, 2.5), (3, 2.2)], out / "loss.png")
        cell = {"name": "elo", "method": "elo", "flops": 2e12, "eval": {"final": {"de": 1.7, "en": 1.0}}}
        study_report.plot({"target_language": "de", "cells": [cell]}, out / "results.png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "template"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["template", "False"]
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("loss.png", "results.png"))


# ------------------------------------------------------------------------------------ a real headless browser

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium here (apt-get install chromium); CI installs it")


def render(html_path: Path, tmp_path: Path) -> tuple[Path, str]:
    """A screenshot of the page and its DOM as headless chromium renders them, offline."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,2400"]
    shot = tmp_path / "report.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", html_path.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", html_path.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return shot, dom.stdout


def check_screenshot(shot: Path, min_orange: int) -> None:
    import numpy as np
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    r, g, b = pixels.T
    inked = int((pixels.min(axis=1) < 200).sum())
    assert inked > 0.03 * len(pixels), f"only {inked} dark pixels: the page rendered (nearly) blank"
    # The charts' orange (#e66100) appears nowhere in the page's CSS: seeing it means the inline PNGs were decoded.
    orange = int(((r > 200) & (g > 70) & (g < 130) & (b < 40)).sum())
    assert orange >= min_orange, f"{orange} orange pixels: the inline charts did not render"


@needs_browser
def test_report_renders_in_headless_chromium(tmp_path):
    run = write_run(tmp_path / "run", make_metrics(english_final=1.03))
    html_path, _ = report.write_report(run)
    shot, dom = render(html_path, tmp_path)
    check_screenshot(shot, min_orange=2000)
    for text in ("German (target language)", "-5.6% bits/char", "English (forgetting check)", "worse than tolerance",
                 "Benchmarks (lm-evaluation-harness)", "Generation samples", "Configuration"):
        assert text in dom, text
    assert "<final>" not in dom
    # Kept for a person to look at when the test runs with --basetemp.
    shutil.copy(shot, run / "screenshot.png")


def test_pipeline_writes_the_report_with_samples_and_lm_eval(tiny_model, corpora, tmp_path, monkeypatch, capsys):
    """A tiny `elo run` naming the local lm-eval task: its metrics, eval files and report, checked end to end."""
    from test_pipeline import tiny_run_config

    from elo_cpt import pipeline

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = tiny_run_config(tiny_model, corpora, "eval.tasks=[elo_tiny_mc]", "eval.include_path=tests/fixtures/lmeval",
                          "eval.sample_tokens=8", "eval.prompts={de: [Guten Morgen]}")
    out = tmp_path / "run"
    metrics = pipeline.run(cfg, out)

    assert set(metrics["lm_eval"]) == {"base", "final"}
    assert metrics["lm_eval"]["final"]["elo_tiny_mc"]["samples"] == 8
    assert {"lm-eval base", "lm-eval final"} <= set(metrics["stages"])
    # Configured German prompts replace the built-in ones; English keeps its built-in prompts.
    assert set(metrics["samples"]) == {"base", "merged", "final"}
    assert [s["prompt"] for s in metrics["samples"]["final"]["de"]] == ["Guten Morgen"]
    assert len(metrics["samples"]["final"]["en"]) == 3
    # Greedy decoding: the same model gives the same completion; the final model differs from the base.
    assert metrics["samples"]["base"] != metrics["samples"]["final"]
    assert {(r["language"], r["reference"]) for r in metrics["forgetting"]} == {("de", "base"), ("en", "base")}
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "Guten Morgen" in page and "elo_tiny_mc" in page and "lm-eval final" in page
    # A finished run without a report (a run from before reports existed) gets one on the next `elo run`.
    (out / "report.html").unlink()
    assert pipeline.run(cfg, out) == metrics and (out / "report.html").is_file()
    if CHROMIUM:
        shot, dom = render(out / "report.html", tmp_path)
        check_screenshot(shot, min_orange=0)
        assert "Guten Morgen" in dom


def test_samples_are_greedy_short_and_per_language(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elo_cpt import samples

    prompts = samples.prompts_for(["de", "en", "fr"], {"ko": ["서울은"], "en": ["Hello"]})
    # Configured prompts win, built-in ones fill in, a language with neither (fr) gets none.
    assert prompts == {"de": samples.DEFAULT_PROMPTS["de"], "en": ["Hello"], "ko": ["서울은"]}
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    first = samples.generate_samples(model, tokenizer, prompts, max_new_tokens=6)
    assert first == samples.generate_samples(model, tokenizer, prompts, max_new_tokens=6)
    assert [s["prompt"] for s in first["de"]] == samples.DEFAULT_PROMPTS["de"]
    # The tiny model never emits its end-of-sequence token: every completion runs to the cap, and a longer cap
    # extends the same greedy completion.
    assert {item["new_tokens"] for items in first.values() for item in items} == {6}
    longer = samples.generate_samples(model, tokenizer, {"en": ["Hello"]}, max_new_tokens=12)["en"][0]
    assert longer["new_tokens"] == 12 and longer["completion"].startswith(first["en"][0]["completion"])
    assert len(longer["completion"]) > len(first["en"][0]["completion"])
