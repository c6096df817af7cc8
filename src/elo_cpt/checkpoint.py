"""Checkpoint I/O: safe loading, lazy tensor access, provenance, and outputs that appear only when complete.

A leaf module: it imports no other part of elo_cpt except the error type.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from elo_cpt.errors import EloError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PROVENANCE = "elo_provenance.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Files besides the weights that make a model folder usable on its own.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def require_model_dir(path: str | Path) -> Path:
    """The model folder `path`, checked to hold a config and safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise EloError(f"model folder {path} does not exist; pass a Hugging Face model folder (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise EloError(f"{path} has no config.json; pass a Hugging Face model folder saved with save_pretrained")
    if not safetensors_files(path):
        if any((path / name).exists() for name in PICKLE_WEIGHTS):
            raise EloError(
                f"{path} holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
                "convert it once with AutoModelForCausalLM.from_pretrained(...).save_pretrained(...) to safetensors"
            )
        raise EloError(f"{path} has no model.safetensors weights; pass a folder saved with save_pretrained")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order (empty if there are none)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    single = model_dir / SAFETENSORS_SINGLE
    return [single] if single.is_file() else []


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of a model folder to the shard that holds it."""
    locations: dict[str, Path] = {}
    for shard in safetensors_files(model_dir):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                locations[name] = shard
    return locations


def read_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a (sharded) safetensors folder."""
    locations = tensor_locations(model_dir)
    missing = [n for n in names if n not in locations]
    if missing:
        raise EloError(f"{model_dir} lacks tensors {missing[:3]}; is it the model the layers came from?")
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(locations[name], []).append(name)
    tensors = {}
    for shard, shard_names in by_shard.items():
        with safe_open(shard, framework="pt") as f:
            for name in shard_names:
                tensors[name] = f.get_tensor(name)
    return tensors


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short content hash of a tensor (dtype, shape and bytes), to recognise the model a layer came from."""
    data = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:32]


def write_json(path: Path, obj: object) -> None:
    """Write JSON through a temporary file so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_provenance(model_dir: Path) -> dict:
    path = Path(model_dir) / PROVENANCE
    if not path.is_file():
        raise EloError(f"{model_dir} has no {PROVENANCE}; pass a shallow model made by `elo detach` or `elo pretrain`")
    return json.loads(path.read_text())


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy config, tokenizer and generation files from one model folder to another."""
    for name in SIDE_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def staging_path(out: Path) -> Path:
    """Where an output is built before it is renamed to `out`; a rerun finds (and may resume from) it here."""
    return out.with_name(f"{out.name}.partial")


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a staging folder that becomes `out` only when the block completes.

    On failure the staging folder is removed, unless `keep_partial` (training keeps its checkpoints there so the
    same command can resume). An existing `out` is an error unless `overwrite`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise EloError(f"output {out} already exists; choose another --out or remove it")
    staging = staging_path(out)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        if not keep_partial:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a model folder for training: safetensors only, no remote code, fp32 on CPU."""
    path = require_model_dir(path)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
