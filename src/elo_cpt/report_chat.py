"""The report's chat section, from metrics.json's `chat`: answer bits/char of held-out conversations per model and
language, their change against the base model (English answers that got worse beyond the tolerance are flagged, as
raw-text forgetting is), and each model's greedy answers to the chat prompts. A leaf module over the metrics
dictionary, as `report` is; the flag itself is `findings.chat_forgetting`.
"""

from __future__ import annotations

from elo_cpt.findings import LANGUAGES, chat_forgetting, label, language


def _cell(text: str, cls: str = "") -> dict:
    return {"text": text, "cls": cls}


def chat_scores(metrics: dict) -> dict:
    """{model: {lang: {answer_bits_per_char, ...}}}, empty when the run has no chat evaluation."""
    return (metrics.get("chat") or {}).get("answer_bits_per_char") or {}


def scores_table(metrics: dict) -> dict | None:
    """Answer bits/char and bits/byte per model and language, the best per language marked."""
    scores = chat_scores(metrics)
    if not scores:
        return None
    languages = list(dict.fromkeys(lang for result in scores.values() for lang in result))
    header = ["model"] + [f"{lang} answer {unit}" for lang in languages for unit in ("bits/char", "bits/byte")]
    best = {lang: min(r[lang]["answer_bits_per_char"] for r in scores.values() if lang in r) for lang in languages}
    rows = []
    for name, result in scores.items():
        cells = [_cell(label(name))]
        for lang in languages:
            value = result.get(lang)
            if value is None:
                cells += [_cell("–"), _cell("–")]
                continue
            cls = "best" if value["answer_bits_per_char"] == best[lang] and len(scores) > 1 else ""
            cells += [_cell(f"{value['answer_bits_per_char']:.4f}", cls), _cell(f"{value['answer_bits_per_byte']:.4f}")]
        rows.append({"cells": cells, "flag": False})
    return {"header": header, "rows": rows}


def changes_table(metrics: dict) -> dict | None:
    """The final and stage-3 models' answer bits/char against the base model's, flagged rows marked."""
    found = chat_forgetting(metrics)
    if not found:
        return None
    header = ["language", "model", "base (answer bits/char)", "model (answer bits/char)", "change", "change %", "verdict"]
    rows = [{"cells": [_cell(language(r["language"])), _cell(label(r["model"])), _cell(f"{r['before']:.4f}"),
                       _cell(f"{r['after']:.4f}"), _cell(f"{r['change']:+.4f}"), _cell(f"{r['change_pct']:+.2f}%"),
                       _cell("⚠ worse than tolerance" if r["flag"] else r["verdict"],
                             "bad" if r["flag"] else "good" if r["change"] < 0 else "")],
             "flag": r["flag"]} for r in found]
    return {"header": header, "rows": rows}


def answer_groups(metrics: dict) -> list[dict]:
    """Chat answers regrouped per language and prompt, each model's answer under the other (an answer cut at the token
    limit, without its end-of-turn token, says so)."""
    groups: dict[tuple[str, str], dict] = {}
    for model, per_lang in ((metrics.get("chat") or {}).get("answers") or {}).items():
        for lang, items in per_lang.items():
            for item in items:
                group = groups.setdefault((lang, item["prompt"]), {"language": language(lang), "prompt": item["prompt"], "answers": []})
                cut = "" if item.get("ended", True) else f" [cut at {item.get('new_tokens', '?')} tokens, no end-of-turn]"
                group["answers"].append({"model": label(model), "text": item["answer"] + cut})
    return list(groups.values())


def chat_cards(metrics: dict) -> list[dict]:
    """Headline cards: the replay language's (English) answer bits/char of the stage-3 model, else the final model,
    against the base model's."""
    replay = metrics.get("config", {}).get("data", {}).get("replay_language", "en")
    rows = {(r["language"], r["model"]): r for r in chat_forgetting(metrics)}
    row = rows.get((replay, "chat_model")) or rows.get((replay, "final"))
    if row is None:
        return []
    return [{"title": f"{LANGUAGES.get(replay, replay)} chat answers: {label(row['model'])} vs base",
             "value": f"{row['change_pct']:+.1f}% answer bits/char",
             "detail": f"{row['before']:.4f} → {row['after']:.4f} (held-out conversations, chat template)",
             "status": "bad" if row["flag"] else "good" if row["change"] < 0 else "neutral"}]


def chat_content(metrics: dict) -> dict | None:
    """Everything the report's chat section shows; None for a run from before chat evaluation existed."""
    chat = metrics.get("chat")
    if chat is None:
        return None
    return {"note": chat.get("not_evaluated", ""), "template": chat.get("template", ""), "scores": scores_table(metrics),
            "changes": changes_table(metrics), "answers": answer_groups(metrics)}


def chat_summary(metrics: dict) -> list[list[str]]:
    """Rows of the printed summary's chat table: answer bits/char per model and language."""
    scores = chat_scores(metrics)
    languages = list(dict.fromkeys(lang for result in scores.values() for lang in result))
    rows = [["model (answer bits/char, chat template)"] + languages] if scores else []
    rows += [[label(name)] + [f"{result[lang]['answer_bits_per_char']:.4f}" if lang in result else "–" for lang in languages]
             for name, result in scores.items()]
    return rows
