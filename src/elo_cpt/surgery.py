"""Model surgery: cut a shallow model out of a causal LM, and write its trained layers back.

The shallow model keeps the embedding, the selected decoder layers, the final norm and the head. The other
layers are not frozen but absent, so they cost nothing. It is an ordinary Hugging Face model of the same class
with a smaller `num_hidden_layers`; `elo_provenance.json` beside it says where its layers came from.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from elo_cpt import checkpoint
from elo_cpt.errors import EloError

_SPEC_ITEM = re.compile(r"^(-?\d+)?(:)?(-?\d+)?$")


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Turn a layer spec such as `0,-1`, `0,15,-1`, `0:4` or `-2:` into sorted absolute indices.

    Items are comma-separated; an item is an index or a Python-style `start:stop` slice; negative indices count
    from the end. Duplicates, indices out of range and empty sets are errors.
    """
    indices: list[int] = []
    for item in str(spec).replace(" ", "").split(","):
        match = _SPEC_ITEM.match(item)
        if not item or not match or (match.group(2) is None and match.group(1) is None):
            raise EloError(f"bad layer spec {spec!r}: {item!r} is not an index or a start:stop range (e.g. 0,-1 or 0:4)")
        start, colon, stop = match.groups()
        if colon is None:
            index = int(start)
            if not -n_layers <= index < n_layers:
                raise EloError(f"layer {index} is out of range for a model with {n_layers} layers (use 0..{n_layers - 1} or negatives)")
            indices.append(index % n_layers)
        else:
            for bound in (start, stop):
                if bound is not None and not -n_layers <= int(bound) <= n_layers:
                    raise EloError(f"layer range {item!r} is out of range for a model with {n_layers} layers")
            indices.extend(range(n_layers)[slice(int(start) if start else None, int(stop) if stop else None)])
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise EloError(f"layer spec {spec!r} names layer(s) {duplicates} more than once")
    if not indices:
        raise EloError(f"layer spec {spec!r} selects no layer")
    return sorted(indices)


def num_layers(config: PretrainedConfig) -> int:
    return int(config.get_text_config().num_hidden_layers)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder stack generically: the ModuleList holding `num_hidden_layers` blocks of one class."""
    n = num_layers(model.config)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n
        and len({type(block) for block in module}) == 1
        and any(p.numel() for p in module.parameters())
    ]
    if len(candidates) != 1:
        raise EloError(
            f"cannot find the decoder layer list of {type(model).__name__} "
            f"({len(candidates)} candidate lists of {n} blocks); this architecture is not supported yet"
        )
    return candidates[0]


def shallow_config(config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The config of a model holding only `layers`, each keeping its original per-layer settings."""
    n = num_layers(config)
    shallow = copy.deepcopy(config)
    text = shallow.get_text_config()
    # Per-layer lists (attention type, sliding window on/off, ...) must follow the layer, not its new index.
    for key, value in list(text.to_diff_dict().items()) + [("layer_types", getattr(text, "layer_types", None))]:
        if isinstance(value, list) and len(value) == n:
            setattr(text, key, [value[i] for i in layers])
    text.num_hidden_layers = len(layers)
    return shallow


def layer_key_map(prefix: str, layers: list[int], names: list[str]) -> dict[str, str]:
    """Map shallow-model tensor names of the kept layers to their names in the original model."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    mapping = {}
    for name in names:
        match = pattern.match(name)
        if match:
            mapping[name] = f"{prefix}.{layers[int(match.group(1))]}.{match.group(2)}"
    return mapping


def build_shallow(base_dir: str | Path, layers_spec: str) -> tuple[PreTrainedModel, dict]:
    """Build the shallow model in memory, reading only the tensors it keeps from the base checkpoint."""
    base_dir = checkpoint.require_model_dir(base_dir)
    config = AutoConfig.from_pretrained(base_dir)
    n = num_layers(config)
    layers = resolve_layers(layers_spec, n)
    dtype = getattr(config, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(shallow_config(config, layers), dtype=dtype)
    prefix, _ = find_decoder_layers(model)
    own_names = list(model.state_dict().keys())
    to_base = layer_key_map(prefix, layers, own_names)
    available = checkpoint.tensor_locations(base_dir)
    wanted = {name: to_base.get(name, name) for name in own_names if to_base.get(name, name) in available}
    tensors = checkpoint.read_tensors(base_dir, list(wanted.values()))
    result = model.load_state_dict({own: tensors[base] for own, base in wanted.items()}, strict=False)
    model.tie_weights()
    untied_missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if untied_missing:
        raise EloError(f"{base_dir} lacks weights for {untied_missing[:3]}; is the checkpoint complete?")
    provenance = {
        "base_model": str(base_dir.resolve()),
        "base_num_layers": n,
        "layers": layers,
        "layer_prefix": prefix,
        "base_config": config.to_dict(),
        # The original tensors this shallow model will replace: merging into another base is refused.
        "replaced_digests": {base: checkpoint.tensor_digest(tensors[base]) for base in to_base.values()},
    }
    return model, provenance


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    return key in params and any(params[key] is p for k, p in params.items() if k != key)


def detach(base_dir: str | Path, layers_spec: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write the shallow model made of `layers_spec` of `base_dir` as a Hugging Face folder at `out`."""
    model, provenance = build_shallow(base_dir, layers_spec)
    with checkpoint.atomic_output(out, overwrite=overwrite) as staging:
        save_shallow(model, provenance, Path(base_dir), staging)
    return Path(out)


def save_shallow(model: PreTrainedModel, provenance: dict, tokenizer_dir: Path, out_dir: Path) -> None:
    """Save a shallow model with its provenance and the base model's tokenizer files."""
    model.save_pretrained(out_dir, safe_serialization=True)
    checkpoint.copy_side_files(tokenizer_dir, out_dir, skip=("config.json", "generation_config.json"))
    checkpoint.write_json(out_dir / checkpoint.PROVENANCE, provenance)


def merge(base_dir: str | Path, shallow_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the base model with the shallow model's layers back in their original positions.

    The base shards are streamed one at a time; every tensor that is not a trained layer's is copied
    bit-identically, and the shard layout, index, config and tokenizer are carried over.
    """
    base_dir = checkpoint.require_model_dir(base_dir)
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    provenance = checkpoint.read_provenance(shallow_dir)
    shallow_names = list(checkpoint.tensor_locations(shallow_dir))
    to_base = layer_key_map(provenance["layer_prefix"], provenance["layers"], shallow_names)
    base_locations = checkpoint.tensor_locations(base_dir)
    mismatched = [
        name
        for name, digest in provenance["replaced_digests"].items()
        if name not in base_locations or checkpoint.tensor_digest(checkpoint.read_tensors(base_dir, [name])[name]) != digest
    ]
    if mismatched:
        raise EloError(
            f"{shallow_dir} was detached from {provenance['base_model']}, not from {base_dir} "
            f"(layer tensor {mismatched[0]} differs); merge into the model it came from"
        )
    trained = {base: tensor for base, tensor in zip(to_base.values(), checkpoint.read_tensors(shallow_dir, list(to_base)).values())}
    with checkpoint.atomic_output(out, overwrite=overwrite) as staging:
        for shard in checkpoint.safetensors_files(base_dir):
            with safe_open(shard, framework="pt") as f:
                metadata = f.metadata()
                tensors = {}
                for name in f.keys():
                    original = f.get_tensor(name)
                    tensors[name] = trained[name].to(original.dtype).contiguous() if name in trained else original
            save_file(tensors, staging / shard.name, metadata=metadata)
            del tensors
        if (base_dir / checkpoint.SAFETENSORS_INDEX).is_file():
            (staging / checkpoint.SAFETENSORS_INDEX).write_bytes((base_dir / checkpoint.SAFETENSORS_INDEX).read_bytes())
        checkpoint.copy_side_files(base_dir, staging)
    return Path(out)
