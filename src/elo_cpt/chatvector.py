"""The chat vector (Huang et al. 2023, arXiv 2310.04799): TARGET + scale x (INSTRUCT - BASE), tensor by tensor.

ELO's stage 3 starts here: the official Instruct model minus the official base model is the "chat vector", and
adding it to the language-adapted model gives it back the Instruct model's chat behaviour. The sum is streamed:
each of TARGET's safetensors shards is copied with every tensor replaced by its sum as its turn comes, so one
tensor of each model is in memory at a time, never three models.

Vocabulary sizes may differ (an adapted model with new tokens): the vector applies to the rows the vocabularies
share (rows 0..min(V)-1 of the embedding and the head; token ids are taken to mean the same tokens there, as
when new tokens are appended), and TARGET's extra rows are kept. `skip=("embeddings", "head")` keeps those
tensors as TARGET's instead, as the paper's code does (`--skip_embed`) for an extended vocabulary.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from elo_cpt import checkpoint, files, hub
from elo_cpt.errors import EloError

#: Written beside the output weights: where the vector came from and how it was applied.
PROVENANCE = "chat_vector.json"
SKIPPABLE = ("embeddings", "head")
#: Checkpoint names of token embeddings and output heads (Llama, Mistral, Qwen, Gemma, Phi: embed_tokens/lm_head;
#: GPT-2: wte; BLOOM/Falcon: word_embeddings; GPT-NeoX: embed_in/embed_out), for when no skeleton can be built.
_EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.(weight|bias)$")
_HEAD_NAME = re.compile(r"(^|\.)(lm_head|embed_out)\.(weight|bias)$")
#: Elements summed at once: bounds the fp32 temporaries of a large embedding.
_CHUNK = 1 << 24

Header = dict[str, tuple[str, tuple[int, ...]]]


def chat_vector(target: str | Path, base: str | Path, instruct: str | Path, out: str | Path, scale: float = 1.0,
                skip: str | Iterable[str] = (), overwrite: bool = False) -> Path:
    """Write `target` + `scale` x (`instruct` - `base`) to the Hugging Face folder `out`.

    Arithmetic is in fp32 and each result is cast back to TARGET's dtype; shards, index, config and tokenizer are
    TARGET's. `skip` ("embeddings", "head", or both, comma-separated or a list) keeps those tensors as TARGET's; in
    a model with tied embeddings the one shared tensor is kept if either is named. The three models must have the
    same tensors and shapes (embedding and head rows excepted, see the module docstring): otherwise one line names
    the first tensor that differs and nothing is written. `chat_vector.json` in `out` records the three models
    (path, hub origin, content digest), the scale, the skipped tensors and any vocabulary difference.
    """
    if not math.isfinite(float(scale)):
        raise EloError(f"--scale must be a finite number, not {scale}")
    scale = float(scale)
    skipped_parts, dirs, headers, embeddings, heads = _inputs(target, base, instruct, skip)
    vocab = set(embeddings) | set(heads)
    tied = not heads  # no head tensor in the file: the embedding is the head too
    skip_names = set(embeddings) if ("embeddings" in skipped_parts or (tied and "head" in skipped_parts)) else set()
    skip_names |= set(heads) if "head" in skipped_parts else set()
    rows = {name: min(headers[role][name][1][0] for role in headers) for name in vocab if name not in skip_names}
    differing = {name: {role: headers[role][name][1][0] for role in headers} for name in sorted(vocab)
                 if len({headers[role][name][1][0] for role in headers}) > 1}
    if any(name in rows for name in differing):
        shared = min(rows[name] for name in differing if name in rows)
        print(f"note: the vocabularies differ ({', '.join(f'{r} {n}' for r, n in next(iter(differing.values())).items())} rows); "
              f"the chat vector applies to the {shared:,} shared rows of the embedding and head only", file=sys.stderr)

    digests: dict[str, dict[str, str]] = {role: {} for role in (*dirs, "output")}
    locations = checkpoint.tensor_locations(dirs["target"])
    bar = tqdm(total=len(locations), desc="chat vector", unit="tensor", leave=False, disable=None)
    with (checkpoint.tensor_reader(dirs["target"]) as read_target, checkpoint.tensor_reader(dirs["base"]) as read_base,
          checkpoint.tensor_reader(dirs["instruct"]) as read_instruct,
          checkpoint.atomic_output(out, overwrite=overwrite) as staging):
        readers = {"target": read_target, "base": read_base, "instruct": read_instruct}
        for shard in checkpoint.safetensors_files(dirs["target"]):
            replacements = {name: functools.partial(_sum, readers, name, scale, name in skip_names, rows.get(name), digests, bar)
                            for name, where in locations.items() if where == shard}
            checkpoint.copy_safetensors(shard, staging / shard.name, replacements)
        bar.close()
        if (dirs["target"] / checkpoint.SAFETENSORS_INDEX).is_file():
            shutil.copy2(dirs["target"] / checkpoint.SAFETENSORS_INDEX, staging / checkpoint.SAFETENSORS_INDEX)
        checkpoint.copy_side_files(dirs["target"], staging)
        model_digests = {role: _combined(found) for role, found in digests.items()}
        provenance = {
            "method": "chat vector (Huang et al. 2023, arXiv 2310.04799): output = target + scale * (instruct - base)",
            **{role: _describe(spec, dirs[role], model_digests[role])
               for role, spec in (("target", target), ("base", base), ("instruct", instruct))},
            "output_digest": model_digests["output"],
            "digest": "sha256 over the sorted 'name digest' lines of every tensor, each digest checkpoint.tensor_digest "
                      "(dtype, shape, bytes): independent of the shard layout",
            "scale": scale,
            "arithmetic": "fp32, cast back to the target's dtype per tensor",
            "skip": sorted(skipped_parts),
            "skipped_tensors": sorted(skip_names),
            "tied_embeddings": tied,
            "vocabulary": {name: {**sizes, "rows_with_vector": rows.get(name, 0)} for name, sizes in sorted(differing.items())},
        }
        files.write_json(staging / PROVENANCE, provenance)
    if model_digests["base"] == model_digests["instruct"]:
        print("warning: base and instruct hold the same weights: the chat vector is zero and the output is the target",
              file=sys.stderr)
    return Path(out)


def check_compatible(target: str | Path, base: str | Path, instruct: str | Path, skip: str | Iterable[str] = ()) -> None:
    """Refuse, with `chat_vector`'s one-line errors, three models whose chat vector cannot be added (another
    architecture, a tensor missing or of another shape, a `skip` that cannot apply), from their configs and safetensors
    headers alone: `elo run` checks this before it trains anything."""
    _inputs(target, base, instruct, skip)


def _inputs(target: str | Path, base: str | Path, instruct: str | Path, skip: str | Iterable[str]):
    """The parts to skip, the three model folders, their tensor headers, and the target's embedding and head tensor
    names, once every check has passed."""
    skipped_parts = _parse_skip(skip)
    dirs = {role: checkpoint.require_model_dir(spec) for role, spec in (("target", target), ("base", base), ("instruct", instruct))}
    configs = {role: json.loads((path / "config.json").read_text()) for role, path in dirs.items()}
    types = {role: config.get("model_type") for role, config in configs.items()}
    if len(set(types.values())) > 1:
        raise EloError(f"the models are of different architectures (target {types['target']}, base {types['base']}, "
                       f"instruct {types['instruct']}); the chat vector needs one architecture")
    headers = {role: _header(path) for role, path in dirs.items()}
    embeddings, heads = vocabulary_tensors(dirs["target"], set(headers["target"]))
    _check_match(headers, dirs, set(embeddings) | set(heads))
    if skipped_parts and not embeddings:
        raise EloError(f"cannot find the token embedding among the tensors of {dirs['target']}, so --skip cannot keep it; "
                       "run without --skip")
    return skipped_parts, dirs, headers, embeddings, heads


def _parse_skip(skip: str | Iterable[str]) -> set[str]:
    parts = [p.strip() for p in (skip.split(",") if isinstance(skip, str) else skip)]
    parts = [p for p in parts if p]
    unknown = [p for p in parts if p not in SKIPPABLE]
    if unknown:
        raise EloError(f"cannot skip {unknown[0]!r}; --skip takes embeddings, head or embeddings,head")
    return set(parts)


def _header(model_dir: Path) -> Header:
    """Name -> (safetensors dtype, shape) of every tensor of a folder, from the file headers alone."""
    found: Header = {}
    for shard in checkpoint.safetensors_files(model_dir):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                found[name] = (part.get_dtype(), tuple(part.get_shape()))
    return found


def vocabulary_tensors(model_dir: Path, names: set[str]) -> tuple[list[str], list[str]]:
    """The checkpoint names of the token embedding's tensors and of the output head's (empty when tied to the
    embedding), from a meta-device skeleton of the model (`get_input_embeddings`, `get_output_embeddings`),
    plus the usual names (embed_tokens, wte, lm_head, ...) for checkpoints whose names the skeleton does not give."""
    embeddings = {n for n in names if _EMBEDDING_NAME.search(n)}
    heads = {n for n in names if _HEAD_NAME.search(n)}
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except (ValueError, KeyError, OSError):  # an architecture transformers cannot build: the names alone
        return sorted(embeddings), sorted(heads - embeddings)
    modules = {id(module): name for name, module in skeleton.named_modules()}
    for found, module in ((embeddings, skeleton.get_input_embeddings()), (heads, skeleton.get_output_embeddings())):
        if module is None or id(module) not in modules:
            continue
        for param, _ in module.named_parameters(recurse=False):
            own = f"{modules[id(module)]}.{param}".lstrip(".")
            # The checkpoint may name it with or without the base model's prefix (model., transformer.).
            found.update(n for n in names if n == own or n.endswith(f".{own}") or own.endswith(f".{n}"))
    return sorted(embeddings), sorted(heads - embeddings)


def _check_match(headers: dict[str, Header], dirs: dict[str, Path], vocab: set[str]) -> None:
    """One line naming the first tensor the three models do not share, or share with another shape."""
    target = headers["target"]
    for role in ("base", "instruct"):
        other = headers[role]
        for name in target:
            if name not in other:
                raise EloError(f"{role} {dirs[role]} has no tensor {name}, which the target has; the chat vector "
                               "needs the target's architecture (same tensors)")
        for name in other:
            if name not in target:
                raise EloError(f"target {dirs['target']} has no tensor {name}, which {role} has; the chat vector "
                               "needs the target's architecture (same tensors)")
    for name, (_, shape) in target.items():
        for role in ("base", "instruct"):
            other = headers[role][name][1]
            same = other[1:] == shape[1:] if name in vocab and len(shape) == len(other) else other == shape
            if not same:
                raise EloError(f"tensor {name} has shape {list(shape)} in the target, {list(other)} in {role} {dirs[role]}; "
                               "the chat vector needs models of one architecture and size")


def _sum(readers: dict[str, Callable[[str], torch.Tensor]], name: str, scale: float, skipped: bool, rows: int | None,
         digests: dict[str, dict[str, str]], bar) -> torch.Tensor:
    """TARGET's tensor `name` plus scale x (INSTRUCT - BASE), in fp32, in TARGET's dtype; the vocabulary rows past
    `rows` (and a skipped tensor, and a tensor that is not floating point) stay TARGET's."""
    target = readers["target"](name)
    base, instruct = readers["base"](name), readers["instruct"](name)
    for role, tensor in (("target", target), ("base", base), ("instruct", instruct)):
        digests[role][name] = checkpoint.tensor_digest(tensor)
    if skipped or not all(t.is_floating_point() for t in (target, base, instruct)):
        result = target
    else:
        result = target.float()  # TARGET's own memory when it is fp32 (read with pread, not mapped): summed in place
        flat = result.view(-1)
        width = math.prod(target.shape[1:]) if target.dim() else 1
        shared = (rows if rows is not None else (target.shape[0] if target.dim() else 1)) * width
        base_flat, instruct_flat = base.reshape(-1), instruct.reshape(-1)
        for start in range(0, shared, _CHUNK):
            stop = min(start + _CHUNK, shared)
            delta = instruct_flat[start:stop].float() - base_flat[start:stop].float()
            if scale != 1.0:
                delta = delta * scale
            flat[start:stop] += delta
        result = result.to(target.dtype)
    digests["output"][name] = checkpoint.tensor_digest(result)
    bar.update()
    return result


def _combined(digests: dict[str, str]) -> str:
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _describe(spec: str | Path, path: Path, digest: str) -> dict:
    described = {"model": str(spec), "path": str(path.resolve()), "digest": digest}
    origin = hub.origin(path)
    if origin:
        described["hub"] = {"repo": origin[0], "commit": origin[1]}
    return described
