"""Generation samples: fixed prompts per language, completed greedily, so runs can be compared by eye.

Greedy decoding makes a sample a property of the model rather than of a random draw: the same model and prompt
always give the same completion, and a change between base and final is a change in the model.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

#: Built-in prompts: plain sentence beginnings, no chat template, so base and instruct models can both continue them.
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "de": [
        "Die Hauptstadt von Deutschland ist",
        "Im Winter ist es in den Bergen oft",
        "Um eine Datei zu löschen, öffnen Sie",
    ],
    "en": [
        "The capital of France is",
        "In winter, the mountains are often",
        "To delete a file, open",
    ],
}


#: Built-in chat prompts, asked through the chat template (`eval.chat_prompts`): a fact and a how-to (the demo
#: conversations' domain), two per language to keep the default run's evaluation short (docs/evaluation.md).
DEFAULT_CHAT_PROMPTS: dict[str, list[str]] = {
    "de": ["Wie heißt die Hauptstadt von Frankreich?", "Wie lösche ich eine Datei?"],
    "en": ["What is the capital of France?", "How do I delete a file?"],
}


def prompts_for(languages: list[str], configured: dict[str, list[str]] | None = None,
                defaults: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Prompts for `languages` and every configured language: the configured ones, else the built-in ones (`defaults`,
    by default DEFAULT_PROMPTS); languages with neither are left out."""
    configured, defaults = configured or {}, DEFAULT_PROMPTS if defaults is None else defaults
    found = {lang: configured.get(lang, defaults.get(lang, [])) for lang in dict.fromkeys([*languages, *configured])}
    return {lang: prompts for lang, prompts in found.items() if prompts}


@torch.no_grad()
def generate_samples(model: PreTrainedModel, tokenizer, prompts: dict[str, list[str]], max_new_tokens: int = 40) -> dict[str, list[dict]]:
    """{lang: [{prompt, completion, new_tokens}]}: each prompt continued greedily by up to `max_new_tokens` tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples: dict[str, list[dict]] = {}
    try:
        for lang, texts in prompts.items():
            samples[lang] = []
            # One prompt at a time: no padding, so the completion cannot depend on the other prompts in a batch.
            for prompt in texts:
                inputs = tokenizer(prompt, return_tensors="pt").to(device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                        temperature=None, top_p=None, top_k=None)
                new = output[0, inputs["input_ids"].shape[1] :]
                completion = tokenizer.decode(new, skip_special_tokens=True)
                samples[lang].append({"prompt": prompt, "completion": completion, "new_tokens": len(new)})
    finally:
        model.train(was_training)
    return samples
