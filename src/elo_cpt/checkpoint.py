"""Checkpoint I/O: safe loading, lazy tensor access, provenance, and outputs that appear only when complete.

A leaf module: it imports no other part of elo_cpt except the error type.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from elo_cpt import hub
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
#: safetensors itself refuses headers above 100 MB.
_MAX_HEADER = 100_000_000
#: The most bytes held in memory while copying, when the kernel cannot copy file to file itself.
_COPY_CHUNK = 16 << 20


def local_path(path: str | Path, weights: bool = True) -> Path:
    """`path`, or the Hugging Face cache folder of a hub id (see `require_model_dir`)."""
    if not Path(path).is_dir() and hub.is_hub_id(str(path)):
        return hub.snapshot(str(path), weights)
    return Path(path)


def require_model_dir(path: str | Path, weights: bool = True) -> Path:
    """The model folder `path`, checked to hold a config and safetensors weights. A hub id (`org/name[@revision]`)
    gives its Hugging Face cache folder, fetched if needed: with every weight shard when `weights`, else with none
    (shards then come one at a time as they are read)."""
    path = local_path(path, weights)
    if not path.is_dir():
        raise EloError(f"model folder {path} does not exist; pass a Hugging Face model folder (config.json + *.safetensors) "
                       "or a hub id (org/name)")
    if weights and hub.origin(path):  # a cache folder fetched without its shards, e.g. by `detach`
        for shard in safetensors_files(path):
            hub.fetch(shard)
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


def _open_shard(shard: Path):
    hub.fetch(shard)  # a shard of a hub model is downloaded when first read
    # pread, not mmap: a tensor read is the model's own memory, not a view of the base files' pages, which would
    # stay mapped as long as the model lives and fault (SIGBUS) if a file were replaced or truncated meanwhile.
    return safe_open(shard, framework="pt", backend="pread")


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of a model folder to the shard that holds it (from the index of a sharded folder, so
    no shard is opened or fetched)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return {name: model_dir / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    locations: dict[str, Path] = {}
    for shard in safetensors_files(model_dir):
        with _open_shard(shard) as f:
            for name in f.keys():
                locations[name] = shard
    return locations


def iter_tensors(model_dir: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors of a (sharded) safetensors folder one at a time, each shard opened once."""
    locations = tensor_locations(model_dir)
    missing = [n for n in names if n not in locations]
    if missing:
        raise EloError(f"{model_dir} lacks tensors {missing[:3]}; is it the model the layers came from?")
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(locations[name], []).append(name)
    for shard, shard_names in by_shard.items():
        with _open_shard(shard) as f:
            for name in shard_names:
                yield name, f.get_tensor(name)


def read_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors from a (sharded) safetensors folder."""
    return dict(iter_tensors(model_dir, names))


@contextlib.contextmanager
def tensor_reader(model_dir: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function reading one tensor of a folder by name, on demand; each shard is opened at most once."""
    locations = tensor_locations(model_dir)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> torch.Tensor:
            if name not in locations:
                raise EloError(f"{model_dir} lacks tensor {name}; is it the model the layers came from?")
            shard = locations[name]
            if shard not in handles:
                handles[shard] = stack.enter_context(_open_shard(shard))
            return handles[shard].get_tensor(name)

        yield read


def tensor_byte_ranges(shard: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file, as absolute [start, end) offsets.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape and data_offsets relative
    to the end of the header for every tensor, plus an optional "__metadata__"), then the raw bytes.
    """
    with shard.open("rb") as f:
        raw_length = f.read(8)
        header_length = struct.unpack("<Q", raw_length)[0] if len(raw_length) == 8 else -1
        if not 0 < header_length <= _MAX_HEADER:
            raise EloError(f"{shard} is not a safetensors file (bad header length); re-save the model with save_pretrained")
        header = json.loads(f.read(header_length))
    data_start = 8 + header_length
    return {
        name: (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def copy_safetensors(src: Path, dst: Path, replacements: Mapping[str, Callable[[], torch.Tensor]]) -> None:
    """Copy a safetensors file byte for byte, except the data of the tensors in `replacements`.

    Each replacement is called when its turn comes, so at most one new tensor is in memory; it must have the
    dtype and shape of the tensor it replaces. The header is kept as it is (same dtypes and shapes give the same
    offsets), so every other tensor, the metadata and any padding stay bit-identical.
    """
    ranges = tensor_byte_ranges(src)
    unknown = sorted(set(replacements) - set(ranges))
    if unknown:
        raise EloError(f"{src} has no tensor {unknown[0]}; merge into the model the layers came from")
    size = src.stat().st_size
    with src.open("rb", buffering=0) as source, dst.open("wb", buffering=0) as target:
        position = 0
        for name in sorted(replacements, key=lambda n: ranges[n][0]):
            start, end = ranges[name]
            _copy_range(source, target, position, start)
            data = _tensor_bytes(replacements[name]())
            if data.nbytes != end - start:
                raise EloError(f"new data for {name} has {data.nbytes} bytes, {src.name} holds {end - start}; the shapes or dtypes differ")
            _write_all(target, data)
            position = end
        _copy_range(source, target, position, size)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # A view, not a copy: the uint8 reinterpretation of a contiguous CPU tensor shares its memory.
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_all(target: BinaryIO, data: memoryview) -> None:
    # An unbuffered file may write less than asked.
    while data.nbytes:
        data = data[target.write(data):]


def _copy_range(source: BinaryIO, target: BinaryIO, start: int, end: int) -> None:
    """Append bytes [start, end) of `source` to `target`, in the kernel where it can, else one chunk at a time."""
    while start < end:
        try:
            copied = os.copy_file_range(source.fileno(), target.fileno(), end - start, start)
        except (AttributeError, OSError):  # not Linux, or a pair of filesystems it cannot copy between
            copied = len(chunk := os.pread(source.fileno(), min(_COPY_CHUNK, end - start), start))
            if copied:
                _write_all(target, memoryview(chunk))
        if copied == 0:
            raise EloError(f"{source.name} ends before byte {end}; the file is truncated, download it again")
        start += copied


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short content hash of a tensor (dtype, shape and bytes), to recognise the model a layer came from."""
    data = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(_tensor_bytes(data))
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


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a model folder: safetensors only, no remote code; in `dtype`, by default bf16 on a GPU that has it
    (inference) and fp32 elsewhere."""
    path = require_model_dir(path)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype holding most of a folder's numbers, read from the safetensors headers alone."""
    counts: dict[torch.dtype, int] = {}
    for shard in safetensors_files(model_dir):
        with _open_shard(shard) as f:
            for name in f.keys():
                part = f.get_slice(name)
                dtype = _SAFETENSORS_FLOATS.get(part.get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(part.get_shape())
    return max(counts, key=counts.get) if counts else torch.float32


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(local_path(path, weights=False), trust_remote_code=False)
