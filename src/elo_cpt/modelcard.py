"""The model card (`README.md` in Hugging Face's format) of a run's final model: base model, languages, data,
method and the bits/char measured by the run. A leaf module: it renders from `metrics.json` alone."""

from __future__ import annotations

from pathlib import Path

import yaml

from elo_cpt import hub
from elo_cpt.findings import LANGUAGES, MODEL_LABELS


#: What the alignment trained, per `align.method`.
_ALIGNED = {"fft": "every parameter was then aligned", "freeze": "the stage-1 layers were then aligned",
            "lora": "LoRA adapters were then aligned and merged into the weights"}


def model_card(metrics: dict) -> str:
    config, data = metrics["config"], metrics.get("data", {})
    target, model = config["target_language"], str(config["model"])
    languages = list(dict.fromkeys([target, *config["data"]["eval"], config["data"].get("replay_language", "en")]))
    front = {"language": languages, "library_name": "transformers", "tags": ["elo-cpt", "continual-pretraining"]}
    if hub.is_hub_id(model.split("@")[0]):
        front["base_model"] = model.split("@")[0]
    stage1 = data.get("stage1", {})
    align = data.get("align", {})
    aligned = (f"{_ALIGNED[config['align']['method']]} on {align['tokens']:,} further tokens" if align.get("tokens")
               else "no alignment followed")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(model).name}, adapted to {LANGUAGES.get(target, target)} with ELO", "",
        f"Continual pretraining of `{model}` with elo-cpt, an implementation of ELO (Efficient Layer-Specific "
        f"Optimization, [arXiv 2601.03648](https://arxiv.org/abs/2601.03648)): stage 1 trained decoder layers "
        f"`{config['layers']}` inside a shallow copy of the model on {stage1.get('tokens', 0):,} tokens ({target} with a "
        f"{config['data'].get('replay_language', 'en')} replay share of {config['data']['english_share']:.0%} by bytes), the layers were written back, and {aligned}.", "",
        "## Measured by the run (bits per character of held-out text, lower is better)", "",
    ]
    evaluation = metrics.get("eval", {})
    chars = config["eval"]["max_chars"]
    extent = f"the first {chars:,} characters of each" if chars else "all of it"
    header = ["model"] + [f"{LANGUAGES.get(lang, lang)} ({lang})" for lang in config["data"]["eval"]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ("base", "final"):
        if name in evaluation:
            cells = [f"{evaluation[name][lang]['bits_per_char']:.4f}" if lang in evaluation[name] else "-"
                     for lang in config["data"]["eval"]]
            lines.append(f"| {MODEL_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += [
        "", f"Held-out text: {', '.join(f'`{path}`' for path in config['data']['eval'].values())} ({extent}).", "",
        "## Limitations", "",
        "Only the held-out text above was measured; raw-text bits/char says nothing about chat answers, instruction "
        "following or safety. The licence is the base model's and the training data's: check both before sharing "
        "this model. The run's `config.yaml` and `metrics.json` hold every setting and figure.", "",
    ]
    return "\n".join(lines)
