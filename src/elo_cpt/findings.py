"""What a run's metrics say: the target-language gain, forgetting, what the merged model's change means, stage 1's
own contribution (against the alignment-only control) and the machine it ran on.

A leaf module of plain functions over the metrics dictionary `elo run` writes; the report, the printed summary and
the model card all read the run through it, so they name models and languages the same way.
"""

from __future__ import annotations

import math

MODEL_LABELS = {
    "base": "base model",
    "merged": "ELO stage 1, merged (before alignment)",
    "final": "ELO final (after alignment)",
    "control": "control: alignment only (no stage 1)",
    "chat_vector": "stage 3: final + chat vector (before SFT)",
    "chat_model": "stage 3: chat model",
}
#: The models the pipeline itself evaluates; every other model under `eval` is a reference run (a baseline).
OWN_MODELS = ("base", "merged", "final", "control", "chat_vector", "chat_model")
#: The models whose chat answers are checked against the base's (`chat_forgetting`): what a run delivers.
CHECKED_CHAT_MODELS = ("final", "chat_model")
STAGE_LABELS = {"detach": "detach", "stage1": "ELO stage 1", "merge": "merge", "align": "alignment",
                "control": "control: alignment only", "chat_vector": "stage 3: chat vector", "sft": "stage 3: SFT"}
#: What each training stage trains, for the cost table: a shallow model's loss is not the full model's.
TRAINED_MODELS = {"stage1": "shallow model", "align": "full model", "control": "full model", "sft": "full model (chat)"}
LANGUAGES = {"de": "German", "en": "English", "fr": "French", "es": "Spanish", "it": "Italian", "ko": "Korean",
             "ja": "Japanese", "zh": "Chinese", "ar": "Arabic", "hi": "Hindi", "ru": "Russian", "pt": "Portuguese"}
DEFAULT_TOLERANCE_PCT = 1.0


def label(name: str) -> str:
    return MODEL_LABELS.get(name, name.replace("_", " "))


def language(code: str) -> str:
    return f"{LANGUAGES[code]} ({code})" if code in LANGUAGES else code


def resumes(metrics: dict) -> dict[str, int]:
    """Per training stage that was interrupted and rerun, how many times it was resumed."""
    return {name: t["resumes"] for name, _, t in training_records(metrics) if t.get("resumes")}


def tolerance_pct(metrics: dict) -> float:
    return float(metrics.get("config", {}).get("eval", {}).get("english_tolerance_pct", DEFAULT_TOLERANCE_PCT))


def references(metrics: dict) -> list[str]:
    """The models the final one is compared with: the base model, then every baseline that was evaluated."""
    evaluation = metrics.get("eval", {})
    return [name for name in evaluation if name == "base" or name not in OWN_MODELS]


def forgetting(metrics: dict) -> list[dict]:
    """Per language and reference model, the final model's change in bits/char (lower is better).

    A row is flagged as forgetting when a language other than the target one (English, the replay language) got
    worse than in the reference by more than the tolerance, `eval.english_tolerance_pct` percent.
    """
    evaluation = metrics.get("eval", {})
    final = evaluation.get("final")
    if not final:
        return []
    tolerance = tolerance_pct(metrics)
    target = metrics.get("config", {}).get("target_language")
    rows = []
    for lang, result in final.items():
        for reference in references(metrics):
            before = evaluation[reference].get(lang, {}).get("bits_per_char")
            if before is None:
                continue
            after = result["bits_per_char"]
            change = after - before
            pct = 100 * change / before if before else math.nan
            flag = lang != target and pct > tolerance
            verdict = "worse" if change > 0 else "better" if change < 0 else "unchanged"
            rows.append({
                "language": lang,
                "reference": reference,
                "before": before,
                "after": after,
                "change": change,
                "change_pct": pct,
                "verdict": verdict,
                "flag": flag,
                "message": (f"forgetting: {language(lang)} bits/char of the final model is {pct:.1f}% worse than the "
                            f"{label(reference)}'s ({before:.4f} -> {after:.4f}; tolerance {tolerance:g}%)") if flag else "",
            })
    return rows


def chat_forgetting(metrics: dict) -> list[dict]:
    """Per language, the final and the stage-3 model's change in answer bits/char against the base model's (held-out
    conversations through the chat template, `metrics["chat"]["answer_bits_per_char"]`; lower is better).

    Flagged, as `forgetting` flags raw text, when a language other than the target one got worse than the base's by
    more than `eval.english_tolerance_pct` percent.
    """
    scores = (metrics.get("chat") or {}).get("answer_bits_per_char") or {}
    base = scores.get("base")
    if not base:
        return []
    tolerance = tolerance_pct(metrics)
    target = metrics.get("config", {}).get("target_language")
    rows = []
    for name in CHECKED_CHAT_MODELS:
        for lang, result in (scores.get(name) or {}).items():
            before = (base.get(lang) or {}).get("answer_bits_per_char")
            if before is None:
                continue
            after = result["answer_bits_per_char"]
            pct = 100 * (after - before) / before if before else math.nan
            flag = lang != target and pct > tolerance
            rows.append({
                "language": lang, "model": name, "before": before, "after": after, "change": after - before,
                "change_pct": pct, "flag": flag,
                "verdict": "worse" if after > before else "better" if after < before else "unchanged",
                "message": (f"chat answers: {language(lang)} answer bits/char of the {label(name)} is {pct:.1f}% worse "
                            f"than the base model's ({before:.4f} -> {after:.4f}; tolerance {tolerance:g}%)") if flag else "",
            })
    return rows


def training_records(metrics: dict) -> list[tuple[str, float | None, dict]]:
    """(label, seconds, training stats) of every pipeline step and baseline, training stats empty if it did not train."""
    records = []
    for name, stage in metrics.get("stages", {}).items():
        records.append((STAGE_LABELS.get(name, name), stage.get("seconds"), stage.get("training") or {}))
    for name, baseline in (metrics.get("baselines") or {}).items():
        training = baseline.get("training") or (baseline if "losses" in baseline or "tokens" in baseline else {})
        seconds = baseline.get("seconds", training.get("seconds"))
        records.append((f"baseline {label(name)}", seconds, training))
    return records




def training_rows(metrics: dict) -> list[dict]:
    """The cost table's rows: every pipeline step and baseline with its label, seconds, training stats (empty if it
    did not train) and the model it trained (the shallow model's loss is not comparable with the full model's)."""
    rows = [{"label": STAGE_LABELS.get(name, name), "seconds": stage.get("seconds"), "training": stage.get("training") or {},
             "model": TRAINED_MODELS.get(name, "full model") if stage.get("training") else ""}
            for name, stage in metrics.get("stages", {}).items()]
    rows += [{"label": label_, "seconds": seconds, "training": training, "model": "full model" if training else ""}
             for label_, seconds, training in training_records(metrics)[len(rows):]]
    return rows


def change(metrics: dict, model: str, reference: str, lang: str) -> dict | None:
    """`model` against `reference` on one language's held-out text: bits/char before and after, change and percent;
    None when either was not evaluated on it."""
    evaluation = metrics.get("eval", {})
    before = evaluation.get(reference, {}).get(lang, {}).get("bits_per_char")
    after = evaluation.get(model, {}).get(lang, {}).get("bits_per_char")
    if before is None or after is None:
        return None
    return {"before": before, "after": after, "change": after - before,
            "change_pct": 100 * (after - before) / before if before else math.nan}


def _moved(pct: float, reference: str) -> str:
    if abs(pct) < 0.1:
        return f"practically unchanged from {reference} ({pct:+.2f}%)"
    return f"{abs(pct):.1f}% {'worse' if pct > 0 else 'better'} than {reference}"


def explanations(metrics: dict) -> list[str]:
    """Plain sentences on what the run's numbers mean: how the merged model moved and why, and what share of the
    target-language gain stage 1 earned (measured against the alignment-only control when the run has one)."""
    config = metrics.get("config", {})
    target = config.get("target_language")
    name = LANGUAGES.get(target, target)
    notes = []
    if vocab := metrics.get("vocab"):
        ratio = (vocab.get("held_out_tokens_per_char") or {}).get(target)
        notes.append(f"The vocabulary was extended by {vocab['added']:,} tokens before stage 1 (`vocab.add`): every model "
                     "but the base uses it, the base its own tokenizer; bits/char compares them on the same characters"
                     + (f" ({name} held-out text: {ratio['before']:.3f} → {ratio['after']:.3f} tokens per character)" if ratio else "")
                     + ". The new rows start as the mean of their pieces' rows, which costs bits/char until they are trained.")
    merged = change(metrics, "merged", "base", target)
    if merged is not None:
        text = (f"Before alignment, the merged model (the base with stage 1's layers {config.get('layers', '?')} written "
                f"back) is {_moved(merged['change_pct'], 'the base')} in {name} ({merged['before']:.4f} → "
                f"{merged['after']:.4f} bits/char).")
        if merged["change_pct"] >= 0.1:
            text += (" Stage 1 trained those layers in a shallow model without the middle layers; written back, they "
                     "receive the middle layers' outputs, which they never trained on, so the merged model can lose "
                     "ground until the alignment fine-tunes the whole model together.")
            text += " The extended vocabulary's new rows, barely trained yet, add to this." if vocab else ""
        notes.append(text)
    own = change(metrics, "final", "control", target)
    if own is not None:
        verdict = ("stage 1 earned nothing measurable over the alignment alone" if abs(own["change_pct"]) < 0.1 else
                   "stage 1 added to the alignment's gain" if own["change"] < 0 else
                   "the alignment alone did better than ELO, so stage 1 cost more than it gave")
        notes.append(f"Stage 1's own contribution in {name}: the final model is "
                     f"{_moved(own['change_pct'], 'the alignment-only control')}, which aligned the base model on the same data and budget without stage "
                     f"1 ({own['before']:.4f} → {own['after']:.4f} bits/char): {verdict}.")
    elif "final" in metrics.get("eval", {}) and "merged" in metrics.get("eval", {}):
        notes.append("This run has no alignment-only control, so its gain cannot be split between stage 1 and the "
                     "alignment: rerun it with control=true to measure stage 1's own share. On the embedded default "
                     "(SmolLM2-135M, German), the alignment alone did as well as ELO (docs/results.md).")
    return notes


def environment_line(metrics: dict) -> str:
    """Where and when the run ran, from metrics.json's `environment`: date, device, precision, library versions."""
    env = metrics.get("environment") or {}
    if not env:
        return ""
    precisions = " / ".join(dict.fromkeys((env.get("precision") or {}).values())) or "?"
    device = env.get("gpu") or env.get("device", "?")
    gpus = f" x {env['gpus']}" if env.get("gpus", 0) > 1 else ""
    processes = f", {env['processes']} processes" if env.get("processes", 1) > 1 else ""
    return (f"finished {env.get('finished', '?')} on {device}{gpus}{processes}, {precisions}; elo-cpt "
            f"{env.get('elo_cpt', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
            f"Python {env.get('python', '?')}")
