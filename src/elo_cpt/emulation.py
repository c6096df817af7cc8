"""A distilled emulator of the removed middle layers (Offsite-Tuning, arXiv 2302.04870) for ELO stage 1.

ELO's shallow model feeds the stream leaving its bottom trained layers straight into its top ones, although the
full model has the middle layers between. The emulator puts k frozen layers there instead: initialised from k evenly
spaced layers of the removed middle, then distilled once so that, given the stream entering the middle, they
reproduce the stream the real middle hands to the next kept layer (each token's relative squared error; the teacher is the
full model, without gradients, on the stage-1 text). Stage 1 then trains the selected layers around it; the
emulator stays frozen and is never written back (its layers are not in the shallow model's `trained_layers`).

An emulator is cached under the cache root (`emulators/<key>/`), keyed by the content of the base model's tensors
the distillation reads (embedding and layers below the middle's end), the trained layers, k, the distillation
rows' token ids (data, budget, tokenizer and seq_len) and the optimiser settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from elo_cpt import checkpoint, data, files, surgery
from elo_cpt.errors import EloError

log = logging.getLogger(__name__).info

EMULATOR_LR = 1e-3
#: Distillation losses: `relative` (the default): each token's ||s - t||^2 / ||t||^2, averaged, or `mse` on the residual
#: stream. The stream's norm differs by orders of magnitude between tokens (SmolLM2's first position, an attention
#: sink, holds about half of its squared norm entering the last layer), and MSE spends itself there: on SmolLM2 it left
#: the typical token worse off than no emulator at all (docs/probe.md).
LOSSES = ("mse", "relative")
BATCH = 4
CACHE_DIR = "emulators"
TENSORS, INFO = "emulator.safetensors", "emulator.json"
VERSION = 1


class _Stop(Exception):
    """Raised by a hook once the stream it waits for is captured: the rest of the forward pass is not needed."""


def emulator_sources(layers: list[int], n_layers: int, k: int) -> tuple[tuple[int, int], list[int]]:
    """The removed middle (a, b) (the stream after base layer a goes into base layer b) and the k evenly spaced
    middle layers the emulator starts from."""
    gaps = [(a, b) for a, b in surgery.bridge_gaps(layers, n_layers) if a >= 0 and b < n_layers]
    if len(gaps) != 1:
        raise EloError(f"stage1.emulator_layers needs trained layers that leave one removed middle between a bottom and "
                       f"a top part (e.g. layers 0,-1 or 0:2,-2:), but layers {layers} leave {len(gaps)}; turn the "
                       "emulator off (stage1.emulator_layers=0) or change the layers")
    a, b = gaps[0]
    middle = list(range(a + 1, b))
    if not 1 <= k <= len(middle):
        raise EloError(f"stage1.emulator_layers={k} must be between 1 and the {len(middle)} removed middle layers "
                       f"({a + 1}..{b - 1}) of layers {layers}")
    picks = [middle[round(i * (len(middle) - 1) / (k - 1))] for i in range(k)] if k > 1 else [middle[len(middle) // 2]]
    return (a, b), picks


def _spec(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def model_digest(model_dir: Path, below: int) -> str:
    """sha256 over config.json and the content digest of every tensor the distillation reads: all but the layers
    from `below` on."""
    config = AutoConfig.from_pretrained(model_dir)
    prefix, _ = surgery.find_decoder_layers(surgery._skeleton(config))
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    names = sorted(name for name in checkpoint.tensor_locations(model_dir)
                   if not (m := pattern.match(name)) or int(m.group(1)) < below)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for name, tensor in checkpoint.iter_tensors(model_dir, names):
        h.update(f"{name}={checkpoint.tensor_digest(tensor)};".encode())
    return h.hexdigest()


def distillation_rows(model_dir: Path, sources: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of `sources` as rows of `seq_len` token ids."""
    if tokens < seq_len:
        raise EloError(f"the emulator needs at least one sequence of {seq_len} tokens to distil on, not {tokens}; raise "
                       "stage1.emulator_tokens (elo emulator --tokens)")
    rows = data.load_training_data(sources, checkpoint.load_tokenizer(model_dir), seq_len, tokens)
    return torch.stack([rows[i]["input_ids"] for i in range(len(rows))])


def build_emulator(model: str | Path, layers: str, k: int, rows: torch.Tensor, lr: float = EMULATOR_LR,
                   seed: int = 0, loss: str = "relative") -> tuple[Path, dict]:
    """The cached emulator of `layers` (a layer spec of what stage 1 trains) with `k` layers distilled on `rows`:
    its cache folder and its record, distilled now if the cache has no such emulator."""
    if loss not in LOSSES:
        raise EloError(f"the emulator's loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    model_dir = checkpoint.require_model_dir(model)
    n = surgery.num_layers(AutoConfig.from_pretrained(model_dir))
    trained = surgery.resolve_layers(layers, n)
    (a, b), picks = emulator_sources(trained, n, k)
    key = {"version": VERSION, "base": model_digest(model_dir, b), "layers": trained, "k": k, "sources": picks,
           "rows": checkpoint.tensor_digest(rows), "tokens": rows.numel(), "seq_len": rows.shape[1], "lr": lr, "seed": seed, "loss": loss}
    folder = files.cache_root() / CACHE_DIR / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if (folder / INFO).is_file():
        log(f"emulator of layers {picks} found in the cache: {folder}")
        return folder, json.loads((folder / INFO).read_text())
    log(f"distilling a {k}-layer emulator (from layers {picks}) of the removed layers {a + 1}..{b - 1} on {rows.numel():,} tokens")
    started = time.perf_counter()
    student, provenance = surgery.build_shallow(model_dir, _spec(trained), _spec(picks))
    teacher = checkpoint.load_model(model_dir, torch.float32).eval()
    stats = _distill(teacher, student.float(), provenance["layers"], (a, b), picks, rows, lr, seed, loss)
    prefix = provenance["layer_prefix"]
    to_base = surgery.layer_key_map(prefix, provenance["layers"], list(student.state_dict()))
    emulator_names = {own: base for own, base in to_base.items() if int(base[len(prefix) + 1:].split(".")[0]) in picks}
    state = {base: student.state_dict()[own].detach().float().cpu().contiguous() for own, base in emulator_names.items()}
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    with files.replacing(folder / TENSORS) as tmp:
        safetensors.torch.save_file(state, tmp)
    info = {"key": key, "gap": [a, b], "sources": picks, **stats, "seconds": round(time.perf_counter() - started, 1)}
    files.write_json(folder / INFO, info)  # written last: its presence marks a complete entry
    log(f"emulator distilled: relative error {stats['error_before']:.4f} -> {stats['error_after']:.4f} "
        f"(no emulator: {stats['error_skip']:.4f}), cached in {folder}")
    return folder, info


def _distill(teacher: PreTrainedModel, student: PreTrainedModel, kept: list[int], gap: tuple[int, int], picks: list[int],
             rows: torch.Tensor, lr: float, seed: int, loss_name: str = "relative") -> dict:
    """Train the student's emulator layers so the stream they hand to base layer b matches the teacher's, given the
    teacher's stream entering the middle. Errors are ||s - t||^2 / ||t||^2 on a held-out batch of `rows` (the last,
    when there are two or more)."""
    a, b = gap
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device)
    student.to(device).train()
    _, t_stack = surgery.find_decoder_layers(teacher)
    _, s_stack = surgery.find_decoder_layers(student)
    student.requires_grad_(False)
    params = [p for i in picks for p in s_stack[kept.index(i)].parameters()]
    for p in params:
        p.requires_grad_(True)
    streams: dict[str, torch.Tensor] = {}

    def capture(name: str, stop: bool):
        def hook(module, args, kwargs):
            streams[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if stop:
                raise _Stop
        return hook

    def inject(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": streams["in"]}
        return (streams["in"], *args[1:]), kwargs

    handles = [t_stack[a + 1].register_forward_pre_hook(capture("in", False), with_kwargs=True),
               t_stack[b].register_forward_pre_hook(capture("target", True), with_kwargs=True),
               s_stack[kept.index(picks[0])].register_forward_pre_hook(inject, with_kwargs=True),
               s_stack[kept.index(b)].register_forward_pre_hook(capture("out", True), with_kwargs=True)]

    def forward(model, ids):
        try:
            model(input_ids=ids)
        except _Stop:
            pass

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            forward(teacher, ids)
        streams["in"], streams["target"] = streams["in"].detach().float(), streams["target"].detach().float()
        forward(student, ids)
        if loss_name == "relative":
            return _token_errors(streams["out"].float(), streams["target"]).mean()
        return torch.nn.functional.mse_loss(streams["out"].float(), streams["target"])

    def errors(ids: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            step(ids)
            out, target, entering = streams["out"].float(), streams["target"], streams["in"]
            scale = target.pow(2).mean()
            cosine = torch.nn.functional.cosine_similarity
            return {"error": float((out - target).pow(2).mean() / scale),
                    "skip": float((entering - target).pow(2).mean() / scale),
                    "token_error": float(_token_errors(out, target).mean()),
                    "token_skip": float(_token_errors(entering, target).mean()),
                    "cosine": float(cosine(out, target, dim=-1).mean()), "cosine_skip": float(cosine(entering, target, dim=-1).mean())}

    batches = rows.to(device).split(BATCH)
    held_out, training = (batches[-1], batches[:-1]) if len(batches) > 1 else (batches[0], batches)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        before = errors(held_out)
        losses = []
        for ids in training:
            loss = step(ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        after = errors(held_out)
    finally:
        for handle in handles:
            handle.remove()
    return {"error_before": before["error"], "error_after": after["error"], "error_skip": before["skip"],
            "token_error_before": before["token_error"], "token_error_after": after["token_error"],
            "token_error_skip": before["token_skip"], "cosine_before": before["cosine"], "cosine_after": after["cosine"],
            "cosine_skip": before["cosine_skip"], "steps": len(training), "train_loss_first": losses[0],
            "train_loss_last": losses[-1]}


def _token_errors(stream: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 of every token."""
    return (stream - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)


def load_emulator(model: PreTrainedModel, provenance: dict, folder: Path) -> int:
    """Copy the cached emulator tensors into the shallow model's emulator layers; return how many tensors."""
    import safetensors.torch

    state = safetensors.torch.load_file(folder / TENSORS)
    own = {base: name for name, base in surgery.layer_key_map(provenance["layer_prefix"], provenance["layers"],
                                                               list(model.state_dict())).items()}
    missing = sorted(set(state) - set(own))
    if missing:
        raise EloError(f"the emulator in {folder} holds {missing[0]}, which the shallow model lacks; delete {folder} and rerun")
    params = model.state_dict()
    with torch.no_grad():
        for base, tensor in state.items():
            params[own[base]].copy_(tensor.to(params[own[base]].dtype))
    return len(state)


def emulator(model: str | Path, layers: str, k: int, sources: list[str], out: str | Path | None = None, tokens: int = 65536,
             seq_len: int = 256, lr: float = EMULATOR_LR, seed: int = 0, max_tokens: int | None = None,
             loss: str = "relative") -> dict:
    """`elo emulator`: distil (or find in the cache) the k-layer emulator of the middle that training `layers` of
    `model` removes, on the first `tokens` tokens of `sources` (at most `max_tokens`); with `out`, also write the
    shallow model (the layers to train around the frozen emulator) there, for `elo pretrain`. Returns its record,
    with `cache` (the cache folder) and `shallow` (`out`, or None)."""
    model_dir = checkpoint.require_model_dir(model)
    if k < 1:
        raise EloError(f"an emulator needs at least 1 layer, not {k}")
    if out is not None:
        checkpoint.check_output(out)
    rows = distillation_rows(model_dir, sources, min(tokens, max_tokens or tokens), seq_len)
    folder, info = build_emulator(model_dir, layers, k, rows, lr, seed, loss)
    if out is not None:
        shallow, provenance = surgery.build_shallow(model_dir, layers, _spec(info["sources"]))
        load_emulator(shallow, provenance, folder)
        provenance["emulator"] = {"cache": str(folder), **{key: info[key] for key in ("sources", "gap", "error_before",
                                                                                       "error_after", "error_skip")},
                                  "tokens": info["key"]["tokens"]}
        with checkpoint.atomic_output(out) as staging:
            surgery.save_shallow(shallow, provenance, model_dir, staging)
    return {**info, "cache": str(folder), "shallow": None if out is None else str(out)}
