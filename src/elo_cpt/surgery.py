"""Model surgery: cut a shallow model out of a causal LM, and write its trained layers back.

The shallow model keeps the embedding, the selected decoder layers, the final norm and the head. The other
layers are not frozen but absent, so they cost nothing. It is an ordinary Hugging Face model of the same class
with a smaller `num_hidden_layers`; `elo_provenance.json` beside it says where its layers came from.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from elo_cpt import checkpoint, files
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


#: Config lists that can have `num_hidden_layers` entries by chance without holding one entry per layer.
_NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "mlp_only_layers"})


def shallow_config(config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The config of a model holding only `layers`, each keeping its original per-layer settings."""
    n = num_layers(config)
    shallow = copy.deepcopy(config)
    text = shallow.get_text_config()
    # Per-layer lists (attention type, sliding window on/off, ...) must follow the layer, not its new index.
    for key, value in list(text.to_diff_dict().items()) + [("layer_types", getattr(text, "layer_types", None))]:
        if key not in _NOT_PER_LAYER and isinstance(value, list) and len(value) == n:
            setattr(text, key, [value[i] for i in layers])
    _renumber_layer_rules(text, layers)
    text.num_hidden_layers = len(layers)
    return shallow


def _renumber_layer_rules(text: PretrainedConfig, layers: list[int]) -> None:
    """Rewrite settings that pick layers by index, so each kept layer keeps the kind it had in the base model."""
    # "The first k layers are X" stays a prefix after dropping layers, since kept layers keep their order.
    for key in ("max_window_layers", "first_k_dense_replace"):
        first_k = getattr(text, key, None)
        if isinstance(first_k, int):
            setattr(text, key, sum(1 for i in layers if i < first_k))
    # Qwen-MoE: layer i has experts iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0. A step
    # does not survive renumbering, so spell the dense layers out instead.
    step, dense = getattr(text, "decoder_sparse_step", None), getattr(text, "mlp_only_layers", None)
    if isinstance(step, int) and step > 0 and isinstance(dense, list):
        text.mlp_only_layers = [new for new, old in enumerate(layers) if old in dense or (old + 1) % step]
        text.decoder_sparse_step = 1


def layer_key_map(prefix: str, layers: list[int], names: list[str]) -> dict[str, str]:
    """Map shallow-model tensor names of the kept layers to their names in the original model."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    mapping = {}
    for name in names:
        match = pattern.match(name)
        if match:
            mapping[name] = f"{prefix}.{layers[int(match.group(1))]}.{match.group(2)}"
    return mapping


def trained_tensor_map(provenance: dict, names: list[str]) -> dict[str, str]:
    """Shallow-model tensor name -> base-model name of what stage 1 trained: the trained layers (frozen emulator
    layers are left out) and any other tensor it trained, such as the final norm."""
    trained = set(provenance.get("trained_layers", provenance["layers"]))
    mapping = {own: base for own, base in layer_key_map(provenance["layer_prefix"], provenance["layers"], names).items()
               if int(base[len(provenance["layer_prefix"]) + 1:].split(".")[0]) in trained}
    return mapping | {name: name for name in provenance.get("trained_tensors", [])}


def final_norm_names(model: nn.Module) -> list[str]:
    """Parameter names of the final norm: the norm module beside the decoder layer list (model.norm in Llama)."""
    prefix, _ = find_decoder_layers(model)
    parent_name = prefix.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    names = [f"{parent_name}.{child}.{param}".lstrip(".")
             for child, module in parent.named_children() if "norm" in type(module).__name__.lower() or "norm" in child.lower()
             for param, _ in module.named_parameters()]
    if not names:
        raise EloError(f"cannot find the final norm of {type(model).__name__}; set stage1.train_norm=false")
    return names


def build_shallow(base_dir: str | Path, layers_spec: str, frozen_spec: str = "") -> tuple[PreTrainedModel, dict]:
    """Build the shallow model in memory, reading only the tensors it keeps from the base checkpoint.

    `frozen_spec` names extra layers kept in the shallow model but never trained or written back (an
    "emulator" of the removed middle, after Offsite-Tuning). Nothing is randomly initialised and no tensor of a
    dropped layer is read: peak memory is about the shallow model itself.
    """
    base_dir = checkpoint.require_model_dir(base_dir, weights=False)  # only the shards holding kept tensors are read
    config = AutoConfig.from_pretrained(base_dir)
    n = num_layers(config)
    trained = resolve_layers(layers_spec, n)
    frozen = resolve_layers(frozen_spec, n) if str(frozen_spec).strip() else []
    both = sorted(set(trained) & set(frozen))
    if both:
        raise EloError(f"layer(s) {both} are both trained and frozen; remove them from stage1.frozen_layers")
    layers = sorted(trained + frozen)
    small_config = shallow_config(config, layers)
    skeleton = _skeleton(small_config)
    prefix, _ = find_decoder_layers(skeleton)
    to_base = _kept_tensors(skeleton, prefix, layers, checkpoint.tensor_locations(base_dir))
    state = checkpoint.read_tensors(base_dir, list(to_base.values()))
    state = {own: state.pop(base) for own, base in to_base.items()}
    layer_names = layer_key_map(prefix, layers, list(state))
    provenance = {
        "base_model": str(base_dir.resolve()),
        "base_num_layers": n,
        "layers": layers,
        "trained_layers": trained,
        "layer_prefix": prefix,
        "base_config": config.to_dict(),
        # The original tensors this shallow model will replace: merging into another base is refused.
        "replaced_digests": {base: checkpoint.tensor_digest(state[own]) for own, base in layer_names.items()
                             if layers[int(own[len(prefix) + 1:].split(".")[0])] in trained},
    }
    model = _load_into(type(skeleton), small_config, state, base_dir, set(layer_names))
    return model, provenance


def _skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The model's module tree with every tensor on the meta device: its class, layer list and tensor names, for free."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _kept_tensors(skeleton: PreTrainedModel, prefix: str, layers: list[int], available: dict[str, Path]) -> dict[str, str]:
    """Map the shallow model's tensor names to the base checkpoint's: the kept layers renumbered, and the other
    tensors the model has (embedding, final norm, head), except a head tied to the embedding.

    A kept layer's tensors are taken whole as the checkpoint names them, so that transformers' own conversions
    (e.g. per-expert MoE tensors fused into one) apply on loading as they would to the full model.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    new_index = {old: new for new, old in enumerate(layers)}
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    wanted = set(skeleton.state_dict()) - tied
    mapping = {}
    for name in available:
        match = pattern.match(name)
        if match is None:
            if name in wanted:
                mapping[name] = name
        elif int(match.group(1)) in new_index:
            mapping[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = name
    return mapping


def _load_into(model_class: type[PreTrainedModel], config: PretrainedConfig, state: dict[str, torch.Tensor], base_dir: Path,
               layer_names: set[str]) -> PreTrainedModel:
    """Instantiate `model_class` around tensors already in memory, the way from_pretrained does for a folder.

    from_pretrained builds on the meta device, takes the given tensors as they are, recomputes the buffers that
    are not saved (rotary frequencies, embedding scales), ties the head and sets the dtype; loading the saved
    shallow model later goes the same way, so the two cannot differ.
    """
    try:
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state, dtype=_dominant_dtype(state.values()), output_loading_info=True
        )
    except RuntimeError as err:  # raised after transformers' load report: a tensor of the wrong shape
        raise EloError(
            f"the tensors of {base_dir} do not fit its config.json (see the load report above); "
            "check that the config and the weights belong to the same model"
        ) from err
    finally:
        state.clear()  # the model holds what it needs; anything converted on the way is garbage now
    missing = sorted(info["missing_keys"])
    if missing or any(p.is_meta for p in model.parameters()):
        raise EloError(f"{base_dir} lacks weights for {missing[:3]}; is the checkpoint complete?")
    unused = sorted(set(info["unexpected_keys"]) & layer_names)
    if unused:
        raise EloError(
            f"the shallow {model_class.__name__} has no place for {unused[:3]} of {base_dir}; "
            "this architecture's per-layer settings are not supported yet"
        )
    return model


def _dominant_dtype(tensors) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's numbers: the dtype the model is built in."""
    counts: Counter[torch.dtype] = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def detach(base_dir: str | Path, layers_spec: str, out: str | Path, overwrite: bool = False, frozen_layers: str = "") -> Path:
    """Write the shallow model made of `layers_spec` (plus the untrained `frozen_layers`) of `base_dir` as a Hugging
    Face folder at `out`."""
    checkpoint.check_output(out, overwrite=overwrite)
    model, provenance = build_shallow(base_dir, layers_spec, frozen_layers)
    # what save_pretrained will write, from the tensors' sizes (a tied head is counted once)
    size = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.state_dict().values()}.values())
    checkpoint.check_output(out, overwrite=overwrite, needed_bytes=size)
    with checkpoint.atomic_output(out, overwrite=overwrite) as staging:
        save_shallow(model, provenance, Path(provenance["base_model"]), staging)  # the folder a hub id resolved to
    return Path(out)


def save_shallow(model: PreTrainedModel, provenance: dict, tokenizer_dir: Path, out_dir: Path) -> None:
    """Save a shallow model with its provenance and the base model's tokenizer files."""
    model.save_pretrained(out_dir, safe_serialization=True)
    checkpoint.copy_side_files(tokenizer_dir, out_dir, skip=("config.json", "generation_config.json"))
    files.write_json(out_dir / checkpoint.PROVENANCE, provenance)


def merge(base_dir: str | Path, shallow_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the base model with the shallow model's layers back in their original positions.

    Each base shard is copied byte for byte except the trained layers' tensors, which are read one at a time
    from the shallow model and cast to the base's dtype: peak memory is about one tensor. Of a tensor whose new
    vocabulary rows alone trained (provenance `trained_rows`), only those rows are taken. The shard layout,
    index, config and tokenizer are carried over.
    """
    checkpoint.check_output(out, overwrite=overwrite)
    base_dir = checkpoint.require_model_dir(base_dir)
    shallow_dir = checkpoint.require_model_dir(shallow_dir)
    checkpoint.check_output(out, overwrite=overwrite, needed_bytes=checkpoint.folder_bytes(base_dir))  # a full copy
    provenance = checkpoint.read_provenance(shallow_dir)
    to_base = trained_tensor_map(provenance, list(checkpoint.tensor_locations(shallow_dir)))
    originals = _check_same_base(base_dir, shallow_dir, provenance, set(to_base.values()))
    base_locations = checkpoint.tensor_locations(base_dir)
    with checkpoint.tensor_reader(shallow_dir) as read_trained, checkpoint.atomic_output(out, overwrite=overwrite) as staging:
        for shard in checkpoint.safetensors_files(base_dir):
            replacements = {
                base: functools.partial(_trained_tensor, read_trained, own, *originals[base],
                                        rows=provenance.get("trained_rows", {}).get(own), base_dir=base_dir)
                for own, base in to_base.items()
                if base_locations[base] == shard
            }
            checkpoint.copy_safetensors(shard, staging / shard.name, replacements)
        if (base_dir / checkpoint.SAFETENSORS_INDEX).is_file():
            shutil.copy2(base_dir / checkpoint.SAFETENSORS_INDEX, staging / checkpoint.SAFETENSORS_INDEX)
        checkpoint.copy_side_files(base_dir, staging)
    return Path(out)


def _check_same_base(base_dir: Path, shallow_dir: Path, provenance: dict, targets: set[str]) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """Refuse a base the shallow model was not detached from; return the dtype and shape of each tensor to replace."""
    digests = provenance["replaced_digests"]
    unknown = sorted(targets - set(digests))
    if unknown:
        raise EloError(f"{shallow_dir} holds layer tensor {unknown[0]}, which its {checkpoint.PROVENANCE} does not list; detach the layers again")
    present = set(checkpoint.tensor_locations(base_dir))
    absent = [name for name in digests if name not in present]
    if absent:
        raise _another_base(base_dir, shallow_dir, provenance, absent[0])
    originals = {}
    # One tensor in memory at a time: the check must not cost what the merge saves.
    for name, tensor in checkpoint.iter_tensors(base_dir, list(digests)):
        if checkpoint.tensor_digest(tensor) != digests[name]:
            raise _another_base(base_dir, shallow_dir, provenance, name)
        originals[name] = (tensor.dtype, tensor.shape)
    return originals


def _another_base(base_dir: Path, shallow_dir: Path, provenance: dict, tensor: str) -> EloError:
    return EloError(
        f"{shallow_dir} was detached from {provenance['base_model']}, not from {base_dir} "
        f"(layer tensor {tensor} differs); merge into the model it came from"
    )


def _trained_tensor(read: Callable[[str], torch.Tensor], name: str, dtype: torch.dtype, shape: torch.Size,
                    rows: list[int] | None = None, base_dir: Path | None = None) -> torch.Tensor:
    tensor = read(name)
    if tensor.shape != shape:
        raise EloError(f"trained tensor {name} has shape {tuple(tensor.shape)}, the base {tuple(shape)}; merge into the model it came from")
    if rows is None:  # training may run in another precision than the checkpoint's (fp32 on CPU, bf16 on GPU)
        return tensor.to(dtype)
    merged = checkpoint.read_tensors(base_dir, [name])[name]  # the base's rows, with the trained new ones
    merged[rows[0]:rows[1]] = tensor[rows[0]:rows[1]].to(dtype)
    return merged


# ------------------------------------------------------------------ bridges

#: Frozen linear maps standing in for the removed layers during stage 1 (written by `add_bridges`).
BRIDGE_FILE = "elo_bridges.safetensors"


def bridge_gaps(layers: list[int], n_layers: int) -> list[tuple[int, int]]:
    """(a, b) for every place where the shallow model feeds the residual stream after base layer `a` (-1: the
    embedding) straight into base layer `b` (`n_layers`: the final norm) although the full model has layers between."""
    kept = [-1, *layers, n_layers]
    return [(a, b) for a, b in zip(kept, kept[1:]) if b > a + 1]


def _final_norm_module(model: nn.Module) -> nn.Module:
    names = final_norm_names(model)
    return model.get_submodule(names[0].rpartition(".")[0])


def _stream_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def fit_bridges(base_dir: str | Path, layers: list[int], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Least-squares affine maps from the residual stream entering base layer a+1 to the stream entering base layer
    b (or the final norm), for every gap of the shallow model, fitted on the full model's states for `rows`.

    Needs the full model in memory once, for one forward pass over `rows` (a few calibration sequences).
    """
    model = checkpoint.load_model(base_dir).eval()
    n = num_layers(model.config)
    hidden = model.config.get_text_config().hidden_size
    if rows.numel() < 4 * hidden:  # hidden + 1 unknowns per output: fewer samples than that fit noise exactly
        print(f"warning: fitting bridges on {rows.numel():,} tokens, under 4x the hidden size ({hidden:,}); the least-squares "
              f"fit is poorly determined: set stage1.bridge_tokens to at least {4 * hidden:,}", file=sys.stderr)
    _, stack = find_decoder_layers(model)
    gaps = bridge_gaps(layers, n)
    watched = {i for a, b in gaps for i in (a + 1, b)}
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in watched}

    def capture(index: int):
        def hook(module, args, kwargs):
            captured[index].append(_stream_input(args, kwargs).detach().reshape(-1, hidden))
        return hook

    handles = [(stack[i] if i < n else _final_norm_module(model)).register_forward_pre_hook(capture(i), with_kwargs=True)
               for i in watched]
    try:
        with torch.no_grad():
            for row in rows.split(4):
                model(input_ids=row.to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    bridges = {}
    for a, b in gaps:
        x = torch.cat(captured[a + 1]).double()
        y = torch.cat(captured[b]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        bridges[f"{a}->{b}"] = torch.linalg.lstsq(x.cpu(), y.cpu()).solution.float().contiguous()
    return bridges


def add_bridges(base_dir: str | Path, shallow_dir: str | Path, rows: torch.Tensor) -> Path:
    """Fit the bridges of a shallow model (see `fit_bridges`) and store them in its folder; stage 1 applies them."""
    import safetensors.torch

    shallow_dir = Path(shallow_dir)
    provenance = checkpoint.read_provenance(shallow_dir)
    bridges = fit_bridges(base_dir, provenance["layers"], rows)
    path = shallow_dir / BRIDGE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(bridges, tmp, metadata={"calibration_tokens": str(rows.numel())})
    tmp.replace(path)
    return path


def apply_bridges(model: PreTrainedModel, shallow_dir: str | Path) -> int:
    """Install the shallow model's frozen bridges (if it has any) as forward pre-hooks; return how many."""
    path = Path(shallow_dir) / BRIDGE_FILE
    if not path.is_file():
        return 0
    import safetensors.torch

    provenance = checkpoint.read_provenance(Path(shallow_dir))
    kept, n = provenance["layers"], provenance["base_num_layers"]
    _, stack = find_decoder_layers(model)
    bridges = safetensors.torch.load_file(path)
    for key, weight in bridges.items():
        b = int(key.split("->")[1])
        target = stack[kept.index(b)] if b < n else _final_norm_module(model)
        # A buffer moves with the model (to the GPU) but is neither trained nor saved, so `merge` never sees it.
        target.register_buffer("_elo_bridge", weight.to(model.dtype), persistent=False)

        def hook(module, args, kwargs):
            hidden = _stream_input(args, kwargs)
            bridged = hidden @ module._elo_bridge[:-1] + module._elo_bridge[-1]
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": bridged}
            return (bridged, *args[1:]), kwargs

        target.register_forward_pre_hook(hook, with_kwargs=True)
    return len(bridges)
