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
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from elo_cpt import hub
from elo_cpt.errors import EloError, first_line

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
#: Files of which a tokenizer is loaded; a folder with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt")
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
    check_model_files(path)
    return path


#: Model types transformers can build as a causal LM but which are encoders (BERT-like) or encoder-decoders.
_ENCODERS = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES) & frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_model_files(path: Path) -> None:
    """Refuse a model folder elo-cpt cannot use, before anything is loaded: a config.json that is not JSON, an
    architecture that is not a decoder-only causal LM, and safetensors shards that are truncated or corrupt (their
    headers, checked against the file sizes; shards of a hub model not yet fetched are checked when read)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise EloError(f"{path}: config.json is not valid JSON ({err}); download the model again or re-save it with "
                       "save_pretrained") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise EloError(f"{path}: config.json names no model_type; pass a Hugging Face model folder saved with save_pretrained")
    supported = "elo-cpt trains decoder-only causal LMs (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)"
    if config.get("is_encoder_decoder") or model_type in _ENCODERS:
        kind = "an encoder-decoder" if config.get("is_encoder_decoder") else "an encoder"
        raise EloError(f"{path} is {kind} model ({model_type}); {supported}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EloError(f"{path} has model_type {model_type!r}, which this transformers cannot load as a causal LM; "
                       f"{supported}; upgrade transformers if it is a newer one")
    for shard in safetensors_files(path):
        if shard.is_file():  # a hub shard not fetched yet is a missing link target
            try:
                with safe_open(shard, framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise EloError(f"{path}: {shard.name} is truncated or corrupt ({err}); download the model again or "
                               "re-save it with save_pretrained") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order (empty if there are none)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return [model_dir / name for name in dict.fromkeys(_weight_map(index).values())]
    single = model_dir / SAFETENSORS_SINGLE
    return [single] if single.is_file() else []


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
            return weight_map
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        pass
    raise EloError(f"{index} is not a valid safetensors index (no weight_map of tensor names to shard files); "
                   "download the model again or re-save it with save_pretrained")


def _open_shard(shard: Path):
    hub.fetch(shard)  # a shard of a hub model is downloaded when first read
    # pread, not mmap: a tensor read is the model's own memory, not a view of the base files' pages, which would
    # stay mapped as long as the model lives and fault (SIGBUS) if a file were replaced or truncated meanwhile.
    try:
        return safe_open(shard, framework="pt", backend="pread")
    except SafetensorError as err:
        raise EloError(f"{shard.parent}: {shard.name} is truncated or corrupt ({err}); download the model again or "
                       "re-save it with save_pretrained") from None


def tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of a model folder to the shard that holds it (from the index of a sharded folder, so
    no shard is opened or fetched)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return {name: model_dir / shard for name, shard in _weight_map(index).items()}
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


def read_provenance(model_dir: Path) -> dict:
    path = Path(model_dir) / PROVENANCE
    if not path.is_file():
        raise EloError(f"{model_dir} has no {PROVENANCE}; pass a shallow model made by `elo detach` or `elo pretrain`")
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        provenance = None
    if not isinstance(provenance, dict) or "layers" not in provenance:
        raise EloError(f"{path} is damaged (not the JSON `elo detach` writes); detach the shallow model again")
    return provenance


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy config, tokenizer and generation files from one model folder to another."""
    for name in SIDE_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def staging_path(out: Path) -> Path:
    """Where an output is built before it is renamed to `out`; a rerun finds (and may resume from) it here."""
    return out.with_name(f"{out.name}.partial")


def check_output(out: str | Path, flag: str = "--out", overwrite: bool = True, needed_bytes: int = 0, file: bool = False) -> Path:
    """Refuse an output location before anything is loaded or written: an existing `out` (unless `overwrite`), a
    file where a folder goes (or, with `file`, a folder where a file goes), a place that cannot be written
    (read-only, /proc, no permission), and less free space than `needed_bytes`. `flag` names the option to change."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise EloError(f"output {out} already exists; choose another {flag} or remove it")
    if out.exists() and out.is_dir() == file:
        kind = "a folder, not a file" if file else "an existing file, not a folder"
        raise EloError(f"output {out} is {kind}; choose another {flag}")
    ancestor = out if out.is_dir() else out.parent  # where the output (or its staging folder) will be made
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EloError(f"cannot create {out}: {ancestor} is a file, not a folder; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".elo-write-check.", dir=ancestor))
    except OSError as err:
        raise EloError(f"cannot write under {ancestor} ({err.strerror or err}); choose another {flag}") from None
    free = shutil.disk_usage(ancestor).free
    if needed_bytes > free:
        raise EloError(f"{out} needs about {needed_bytes / 1e6:,.1f} MB but {ancestor} has {free / 1e6:,.1f} MB free; "
                       f"free some space or choose another {flag}")
    return out


def folder_bytes(folder: Path) -> int:
    """The bytes of the files directly in a folder (a model folder's weights and side files)."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


@contextlib.contextmanager
def new_parents(path: Path) -> Iterator[None]:
    """Create the missing parents of `path`; remove those still empty if the block fails."""
    missing = [p for p in Path(path).parents if not p.exists()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False,
                  keep_partial: bool | Callable[[BaseException], bool] = False) -> Iterator[Path]:
    """Yield a staging folder that becomes `out` only when the block completes.

    On failure the staging folder is removed (and any parent folder made for it), unless `keep_partial` is true or,
    given a function, returns true for the exception (training keeps its checkpoints there so the same command can
    resume). An existing `out` is an error unless `overwrite`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise EloError(f"output {out} already exists; choose another --out or remove it")
    staging = staging_path(out)
    with new_parents(staging):
        staging.mkdir(exist_ok=True)
        try:
            yield staging
        except BaseException as err:
            if not (keep_partial(err) if callable(keep_partial) else keep_partial):
                shutil.rmtree(staging, ignore_errors=True)
            raise  # kept folders are not empty, so their parents stay
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
    """The tokenizer of a model folder (or hub id); a folder without a usable one is a one-line error."""
    path = local_path(path, weights=False)  # a tokenizer folder needs no weights (e.g. `elo bench --data`)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EloError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); copy the tokenizer "
                       "files of the model it came from into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError, ... for missing or broken files
        reason = first_line(err).rstrip(" :")
        raise EloError(f"{path} has no usable tokenizer ({reason}); copy the tokenizer files (tokenizer.json, "
                       "tokenizer_config.json, ...) of the model it came from into it") from err
    if not callable(tokenizer):
        raise EloError(f"{path} has no usable tokenizer; copy the tokenizer files of the model it came from into it")
    return tokenizer
