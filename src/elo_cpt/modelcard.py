"""The model cards (`README.md` in Hugging Face's format) of a run's final model and of its stage-3 chat model: base
model, languages, data, method and what the run measured. A leaf module: it renders from `metrics.json` alone."""

from __future__ import annotations

from pathlib import Path

import yaml

from elo_cpt import hub
from elo_cpt.findings import LANGUAGES, MODEL_LABELS


#: What the alignment trained, per `align.method`.
_ALIGNED = {"fft": "every parameter was then aligned", "freeze": "the stage-1 layers were then aligned",
            "lora": "LoRA adapters were then aligned and merged into the weights"}


def _header(metrics: dict, title: str, tags: list[str]) -> list[str]:
    """The front matter, title and the paragraph on the ELO adaptation."""
    config, data = metrics["config"], metrics.get("data", {})
    target, model = config["target_language"], str(config["model"])
    languages = list(dict.fromkeys([target, *config["data"]["eval"], config["data"].get("replay_language", "en")]))
    front = {"language": languages, "library_name": "transformers", "tags": ["elo-cpt", "continual-pretraining", *tags]}
    if hub.is_hub_id(model.split("@")[0]):
        front["base_model"] = model.split("@")[0]
    stage1 = data.get("stage1", {})
    align = data.get("align", {})
    aligned = (f"{_ALIGNED[config['align']['method']]} on {align['tokens']:,} further tokens" if align.get("tokens")
               else "no alignment followed")
    return [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {title}{Path(model).name}, adapted to {LANGUAGES.get(target, target)} with ELO", "",
        f"Continual pretraining of `{model}` with elo-cpt, an implementation of ELO (Efficient Layer-Specific "
        f"Optimization, [arXiv 2601.03648](https://arxiv.org/abs/2601.03648)): stage 1 trained decoder layers "
        f"`{config['layers']}` inside a shallow copy of the model on {stage1.get('tokens', 0):,} tokens ({target} with a "
        f"{config['data'].get('replay_language', 'en')} replay share of {config['data']['english_share']:.0%} by bytes), the layers were written back, and {aligned}.", "",
    ]


def _table(results: dict, languages: list[str], key: str, models: tuple[str, ...]) -> list[str]:
    lines = ["| model | " + " | ".join(f"{LANGUAGES.get(lang, lang)} ({lang})" for lang in languages) + " |",
             "|" + "---|" * (len(languages) + 1)]
    for name in models:
        if name in results:
            cells = [f"{results[name][lang][key]:.4f}" if lang in results[name] else "-" for lang in languages]
            lines.append(f"| {MODEL_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def model_card(metrics: dict) -> str:
    config = metrics["config"]
    lines = _header(metrics, "", []) + ["## Measured by the run (bits per character of held-out text, lower is better)", ""]
    chars = config["eval"]["max_chars"]
    extent = f"the first {chars:,} characters of each" if chars else "all of it"
    lines += _table(metrics.get("eval", {}), list(config["data"]["eval"]), "bits_per_char", ("base", "final"))
    lines += [
        "", f"Held-out text: {', '.join(f'`{path}`' for path in config['data']['eval'].values())} ({extent}).", "",
        "## Limitations", "",
        "Only the held-out text above was measured; raw-text bits/char says nothing about chat answers, instruction "
        "following or safety. The licence is the base model's and the training data's: check both before sharing "
        "this model. The run's `config.yaml` and `metrics.json` hold every setting and figure.", "",
    ]
    return "\n".join(lines)


def chat_model_card(metrics: dict) -> str:
    """The card of the stage-3 model (OUT/chat_model): the adaptation, then the chat vector and the SFT that made the
    chat model, and its answer bits/char through the chat template next to the base and final models'."""
    config, stages = metrics["config"], metrics.get("stages", {})
    chat, sft = config.get("chat") or {}, config.get("sft") or {}
    steps = []
    if chat.get("base"):
        kept = f", keeping the final model's {' and '.join(chat['skip'])}" if chat.get("skip") else ""
        steps.append(f"the chat vector `{chat['instruct']}` minus `{chat['base']}` (x {chat.get('scale', 1.0):g}) was "
                     f"added to it{kept}")
    if sft.get("data"):
        tokens = ((stages.get("sft") or {}).get("training") or {}).get("tokens")
        steps.append(f"it was fine-tuned ({sft.get('method', 'fft')}) on the conversations of "
                     f"{', '.join(f'`{d}`' for d in sft['data'])}" + (f" ({tokens:,} tokens)" if tokens else "")
                     + ", with the loss on the assistant's answers only")
    lines = _header(metrics, "Chat model: ", ["chat"])
    lines += [f"Stage 3 then made this chat model of the final model: {'; then '.join(steps)}.", ""]
    scores = (metrics.get("chat") or {}).get("answer_bits_per_char") or {}
    languages = list(dict.fromkeys(lang for result in scores.values() for lang in result))
    if languages:
        lines += ["## Measured by the run (answer bits per character of held-out conversations through the chat "
                  "template, lower is better)", ""]
        lines += _table(scores, languages, "answer_bits_per_char", ("base", "final", "chat_model"))
        lines += ["", f"Held-out conversations: {', '.join(f'`{p}`' for p in config['eval'].get('chat', {}).values())}.", ""]
    lines += ["## Limitations", "",
              "Answer bits/char measures how well the model predicts given answers, not whether its own answers are "
              "right, helpful or safe. The licence is that of the base model, the Instruct model and the training data: "
              "check them before sharing this model. The run's `config.yaml` and `metrics.json` hold every setting and "
              "figure.", ""]
    return "\n".join(lines)
