"""Model surgery on tiny random models of several architectures: parity, write-back, provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import ARCHITECTURES, VOCAB, save_tiny_model
from elo_cpt import checkpoint, surgery
from elo_cpt.errors import EloError
from elo_cpt.train import train_only_layers


@pytest.mark.parametrize(
    "spec, expected",
    [("0,-1", [0, 9]), ("0,5,-1", [0, 5, 9]), ("0:4", [0, 1, 2, 3]), ("-2:", [8, 9]), (" 3 , 1 ", [1, 3]), ("0,8:", [0, 8, 9])],
)
def test_resolve_layers(spec, expected):
    assert surgery.resolve_layers(spec, 10) == expected


@pytest.mark.parametrize(
    "spec, message",
    [("0,10", "out of range"), ("-11", "out of range"), ("0,0", "more than once"), ("0:2,1", "more than once"),
     ("5:2", "selects no layer"), ("a", "not an index"), ("", "not an index"), ("0,,1", "not an index"), ("0:20", "out of range")],
)
def test_resolve_layers_rejects(spec, message):
    with pytest.raises(EloError, match=message):
        surgery.resolve_layers(spec, 10)


def identity_middle(model, keep: list[int]) -> None:
    """Make every decoder layer not in `keep` return its input unchanged."""

    def passthrough(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    _, layers = surgery.find_decoder_layers(model)
    for index, layer in enumerate(layers):
        if index not in keep:
            layer.register_forward_hook(passthrough, with_kwargs=True)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("spec", ["0,-1", "1,3"])
def test_shallow_model_matches_full_model_with_identity_middle(tmp_path, arch, spec):
    base = save_tiny_model(tmp_path / "base", arch, num_layers=5)
    surgery.detach(base, spec, tmp_path / "shallow")
    full = AutoModelForCausalLM.from_pretrained(base)
    shallow = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    keep = surgery.resolve_layers(spec, 5)
    assert type(shallow) is type(full)
    assert surgery.num_layers(shallow.config) == 2
    _, shallow_layers = surgery.find_decoder_layers(shallow)
    assert len(shallow_layers) == 2
    # layer_idx renumbered for the KV cache; per-layer attention types follow the layer, not its new index.
    for new, layer in enumerate(shallow_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == new
    if getattr(full.config, "layer_types", None):
        assert shallow.config.layer_types == [full.config.layer_types[i] for i in keep]
    identity_middle(full, keep)
    tokens = torch.randint(0, VOCAB, (2, 24))  # longer than the sliding window of 8
    torch.testing.assert_close(shallow(tokens).logits, full(tokens).logits, rtol=0, atol=0)
    assert shallow.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_middle_layers_are_not_executed_and_only_selected_layers_get_gradients(tmp_path):
    base = save_tiny_model(tmp_path / "base", num_layers=6)
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    shallow = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    calls = []
    layer_class = type(surgery.find_decoder_layers(shallow)[1][0])
    for module in shallow.modules():
        if isinstance(module, layer_class):
            module.register_forward_hook(lambda m, a, o: calls.append(m))
    trainable = train_only_layers(shallow)
    tokens = torch.randint(0, VOCAB, (2, 16))
    shallow(tokens, labels=tokens).loss.backward()
    assert len(calls) == 2  # the two kept layers, nothing else runs
    # The shallow checkpoint holds no tensor of the removed layers at all.
    with safe_open(tmp_path / "shallow" / "model.safetensors", "pt") as f:
        layer_ids = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    assert layer_ids == {0, 1}
    with_grad = {n for n, p in shallow.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in shallow.named_parameters() if n.startswith("model.layers.")}
    assert trainable == sum(p.numel() for p in shallow.model.layers.parameters())


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_merge_writes_back_exactly_the_selected_layers(tmp_path, arch):
    base = save_tiny_model(tmp_path / "base", arch, num_layers=5)
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    shallow = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    prefix, layers = surgery.find_decoder_layers(shallow)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(0.5)
    shallow.save_pretrained(tmp_path / "shallow", safe_serialization=True)
    surgery.merge(base, tmp_path / "shallow", tmp_path / "merged")

    def tensors(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    before, after, trained = tensors(base), tensors(tmp_path / "merged"), tensors(tmp_path / "shallow")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if k.startswith((f"{prefix}.0.", f"{prefix}.4.")) and before[k].dtype.is_floating_point}
    assert changed == expected
    assert torch.equal(after[f"{prefix}.4.{next(iter(k.split('.', 3)[3] for k in expected))}"],
                       trained[f"{prefix}.1.{next(iter(k.split('.', 3)[3] for k in expected))}"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_refuses_another_base_model(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0)
    other = save_tiny_model(tmp_path / "other", seed=1)
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    with pytest.raises(EloError, match="detached from"):
        surgery.merge(other, tmp_path / "shallow", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_detach_records_provenance_and_refuses_bad_input(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    provenance = json.loads((tmp_path / "shallow" / checkpoint.PROVENANCE).read_text())
    assert provenance["layers"] == [0, 4] and provenance["layer_prefix"] == "model.layers"
    assert set(provenance["replaced_digests"]) == {k for k in checkpoint.tensor_locations(base) if k.startswith(("model.layers.0.", "model.layers.4."))}
    with pytest.raises(EloError, match="out of range"):
        surgery.detach(base, "0,7", tmp_path / "bad")
    with pytest.raises(EloError, match="does not exist"):
        surgery.detach(tmp_path / "missing", "0,-1", tmp_path / "bad")
    with pytest.raises(EloError, match="already exists"):
        surgery.detach(base, "0,-1", tmp_path / "shallow")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_pickle_weights_are_refused(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "base"))
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    for f in (tmp_path / "pickled").glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(EloError, match="pickle"):
        surgery.detach(tmp_path / "pickled", "0,-1", tmp_path / "shallow")
