"""`elo probe`: how much each decoder layer matters for target-language text, next to English, and which layers to
train in stage 1 (`layers: probe` in a run or a study cell).

Two measures per layer and language, on the first `tokens` tokens of each language's text:

    block influence  1 - cosine(layer input, layer output) of the residual stream, averaged over tokens (ShortGPT's
                     measure: how much the layer changes the stream)
    grad_norm        the L2 norm of the layer's gradient under the LM loss (mean over the text): how hard the
                     language's loss pulls on the layer's weights

The suggested set is the K layers with the highest target-to-English gradient share ratio,
(g_target(l) / sum g_target) / (g_en(l) / sum g_en): the layers the target language needs more than English does.
Without English text it is the K layers with the largest target gradient norm. Ties go to the lower layer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from elo_cpt import checkpoint, data, files, report_figures, surgery
from elo_cpt.config import RunConfig, probe_size
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info

#: What `probe` writes in its output folder, and the rule its suggestion follows.
PROBE_JSON, PROBE_PNG, PROBE_DIR = "probe.json", "probe.png", "probe"
RULE = ("the K layers with the highest ratio of the target's gradient-norm share to English's, "
        "(g_target(l) / sum g_target) / (g_en(l) / sum g_en); without English, the K largest target gradient norms")
BATCH = 4


def probe(model: str | Path, sources: list[str], english: list[str] | None = None, tokens: int = 8192,
          seq_len: int = 256, layers: int = 2, out: str | Path | None = None, target_language: str = "target") -> dict:
    """Block influence and gradient norm of every decoder layer of `model` on the first `tokens` tokens of `sources`
    (and of `english`, when given), and the `layers` layers it suggests training (module docstring); written to
    `out/probe.json` and `out/probe.png` when `out` is given. Returns the JSON's content."""
    if seq_len < 1 or tokens < seq_len:
        raise EloError(f"--tokens ({tokens}) must hold at least one sequence of --seq-len ({seq_len}) tokens")
    if not sources:
        raise EloError("elo probe needs target-language text: give --data SOURCE")
    model_dir = checkpoint.require_model_dir(model)
    n = surgery.num_layers(AutoConfig.from_pretrained(model_dir))
    if not 1 <= layers <= n:
        raise EloError(f"--layers must be between 1 and the model's {n} layers, not {layers}")
    tokenizer = checkpoint.load_tokenizer(model_dir)
    lm = checkpoint.load_model(model_dir).eval()
    lm.to("cuda" if torch.cuda.is_available() else "cpu")
    texts = {target_language: sources} | ({"en": english} if english else {})
    measured = {}
    for lang, srcs in texts.items():
        rows = data.load_training_data(list(srcs), tokenizer, seq_len, tokens)
        ids = torch.stack([rows[i]["input_ids"] for i in range(len(rows))])
        log(f"probing {n} layers on {ids.numel():,} {lang} tokens")
        measured[lang] = (*_measure(lm, ids), ids.numel())
    table = [{"layer": i,
              "block_influence": {lang: m[0][i] for lang, m in measured.items()},
              "grad_norm": {lang: m[1][i] for lang, m in measured.items()}} for i in range(n)]
    scores = suggestion_scores(table, target_language, "en" if english else None)
    for row, score in zip(table, scores):
        row["score"] = score
    suggested = sorted(sorted(range(n), key=lambda i: (-scores[i], i))[:layers])
    result = {"model": str(model_dir), "num_layers": n, "seq_len": seq_len, "target_language": target_language,
              "tokens": {lang: m[2] for lang, m in measured.items()}, "sources": {lang: list(s) for lang, s in texts.items()},
              "rule": RULE, "suggested": suggested, "suggested_spec": ",".join(map(str, suggested)), "layers": table}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files.write_bytes(out / PROBE_PNG, report_figures.plot_layer_probe(table, suggested, list(texts)))
        files.write_json(out / PROBE_JSON, result)
    return result


def _measure(lm, ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: mean over tokens of 1 - cos(input, output), and the gradient norm of the mean LM loss over `ids`."""
    _, stack = surgery.find_decoder_layers(lm)
    influence = torch.zeros(len(stack), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}

    def before(index):
        def hook(module, args, kwargs):
            inputs[index] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        return hook

    def after(index):
        def hook(module, args, kwargs, output):
            out = (output[0] if isinstance(output, tuple) else output).detach()
            cos = torch.nn.functional.cosine_similarity(inputs.pop(index).float(), out.float(), dim=-1)
            influence[index] += (1 - cos).double().sum().cpu()
        return hook

    handles = [h for i, block in enumerate(stack) for h in (block.register_forward_pre_hook(before(i), with_kwargs=True),
                                                             block.register_forward_hook(after(i), with_kwargs=True))]
    lm.zero_grad(set_to_none=True)
    batches = ids.split(BATCH)
    try:
        for batch in batches:
            batch = batch.to(lm.device)
            (lm(input_ids=batch, labels=batch).loss * len(batch) / len(ids)).backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = [sum(float(p.grad.float().pow(2).sum()) for p in block.parameters() if p.grad is not None) ** 0.5 for block in stack]
    lm.zero_grad(set_to_none=True)
    return (influence / ids.numel()).tolist(), grads


def suggestion_scores(table: list[dict], target: str, english: str | None) -> list[float]:
    """Each layer's score under RULE (higher: more worth training for the target language)."""
    def share(lang):
        values = [row["grad_norm"][lang] for row in table]
        total = sum(values) or 1.0
        return [v / total for v in values]

    if english is None:
        return [row["grad_norm"][target] for row in table]
    return [t / e if e > 0 else float("inf") for t, e in zip(share(target), share(english))]


def format_table(result: dict) -> str:
    """The probe's result as a text table, one row per layer, the suggested ones marked with *."""
    langs = list(result["tokens"])
    head = "layer  " + "  ".join(f"BI {lang:>6}" for lang in langs) + "  " + "  ".join(f"grad {lang:>6}" for lang in langs)
    lines = [head + "     score"]
    for row in result["layers"]:
        mark = "*" if row["layer"] in result["suggested"] else " "
        lines.append(f"{row['layer']:>4}{mark}  " + "  ".join(f"{row['block_influence'][lang]:9.4f}" for lang in langs) + "  "
                     + "  ".join(f"{row['grad_norm'][lang]:11.4g}" for lang in langs) + f"  {row['score']:8.3f}")
    lines.append(f"suggested layers: {result['suggested_spec']} ({RULE})")
    return "\n".join(lines)


def probe_layers(cfg: RunConfig, folder: Path) -> RunConfig:
    """`cfg` with `layers: probe[:K]` replaced by the layers the probe suggests, measured on the run's corpora (the
    first stage1.probe_tokens tokens per language) and cached in `folder/probe` (reused while its settings hold)."""
    k = probe_size(cfg.layers)
    if k is None:
        return cfg
    english = cfg.data.english if cfg.data.english_share > 0 else []
    settings = {"model": str(cfg.model), "target": list(cfg.data.target), "english": list(english),
                "tokens": cfg.stage1.probe_tokens, "seq_len": cfg.seq_len, "k": k}
    path = folder / PROBE_DIR / PROBE_JSON
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is None or cached.get("settings") != settings:
        log(f"layers: {cfg.layers}: probing the layers of {cfg.model} on the run's corpora")
        cached = probe(cfg.model, cfg.data.target, english or None, cfg.stage1.probe_tokens, cfg.seq_len, k,
                       target_language=cfg.target_language)
        cached["settings"] = settings
        (folder / PROBE_DIR).mkdir(parents=True, exist_ok=True)
        files.write_bytes(folder / PROBE_DIR / PROBE_PNG, report_figures.plot_layer_probe(
            cached["layers"], cached["suggested"], list(cached["tokens"])))
        files.write_json(path, cached)
    log(f"layers: {cfg.layers} -> {cached['suggested_spec']} (the probe's suggestion, {path})")
    return replace(cfg, layers=cached["suggested_spec"])
