"""Model surgery on tiny random models of several architectures: parity, write-back, provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

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


def assert_shallow_matches_full(tmp_path, arch: str, spec: str, num_layers: int = 5):
    base = save_tiny_model(tmp_path / "base", arch, num_layers=num_layers)
    surgery.detach(base, spec, tmp_path / "shallow")
    full = AutoModelForCausalLM.from_pretrained(base)
    shallow = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    keep = surgery.resolve_layers(spec, num_layers)
    assert type(shallow) is type(full)
    assert surgery.num_layers(shallow.config) == len(keep)
    _, shallow_layers = surgery.find_decoder_layers(shallow)
    assert len(shallow_layers) == len(keep)
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
    return full, shallow


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("spec", ["0,-1", "1,3"])
def test_shallow_model_matches_full_model_with_identity_middle(tmp_path, arch, spec):
    assert_shallow_matches_full(tmp_path, arch, spec)


@pytest.mark.parametrize(
    "arch, num_layers, spec",
    [("gemma2", 5, "0,1"), ("gemma2", 5, "1,2,4"), ("gemma3_text", 6, "4,5"), ("gemma3_text", 12, "0,5,6,11"), ("qwen2", 5, "1,2")],
)
def test_kept_layers_of_different_attention_types_keep_their_own(tmp_path, arch, num_layers, spec):
    """Sliding and global layers side by side: each keeps its original type, window and rotary base."""
    full, shallow = assert_shallow_matches_full(tmp_path, arch, spec, num_layers)
    assert len(set(shallow.config.layer_types)) == 2
    if arch == "qwen2":  # layers below max_window_layers use full attention: kept layer 1 only
        assert shallow.config.max_window_layers == 1


# Not in conftest.ARCHITECTURES, which the training tests share: mixture-of-experts layers, some of them dense.
# Layer 1 has experts (every 2nd layer), the others are dense, layer 3 by mlp_only_layers.
MOE = {
    "qwen3_moe": {**ARCHITECTURES["qwen3"], "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
}


@pytest.mark.parametrize("spec", ["0,1", "1,2,3,4"])
def test_moe_layers_keep_their_dense_or_sparse_kind(tmp_path, spec, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "qwen3_moe", MOE["qwen3_moe"])
    full, shallow = assert_shallow_matches_full(tmp_path, "qwen3_moe", spec)
    _, full_layers = surgery.find_decoder_layers(full)
    _, shallow_layers = surgery.find_decoder_layers(shallow)
    keep = surgery.resolve_layers(spec, 5)
    assert [type(layer.mlp) for layer in shallow_layers] == [type(full_layers[i].mlp) for i in keep]
    # Written back in the checkpoint's per-expert naming: an untrained round trip changes no byte.
    surgery.merge(tmp_path / "base", tmp_path / "shallow", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()


def test_built_model_equals_the_saved_one_buffers_included(tmp_path):
    """The in-memory shallow model (built on the meta device) has the buffers a fresh load recomputes."""
    for arch in sorted(ARCHITECTURES):
        base = save_tiny_model(tmp_path / arch, arch, num_layers=5)
        built, _ = surgery.build_shallow(base, "0,-1")
        surgery.detach(base, "0,-1", tmp_path / f"{arch}-shallow")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}-shallow")
        assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()]), arch
        for kind in ("named_parameters", "named_buffers"):
            mine, theirs = dict(getattr(built, kind)()), dict(getattr(loaded, kind)())
            assert mine.keys() == theirs.keys(), (arch, kind)
            for name in mine:
                assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), (arch, name)
        tokens = torch.randint(0, VOCAB, (2, 12))
        torch.testing.assert_close(built.eval()(tokens).logits, loaded(tokens).logits, rtol=0, atol=0)


def test_detach_reads_only_the_kept_tensors_and_keeps_the_tie(tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "base", "llama", num_layers=6)  # tie_word_embeddings=True
    requested = []
    read_tensors = checkpoint.read_tensors
    monkeypatch.setattr(checkpoint, "read_tensors", lambda folder, names: requested.extend(names) or read_tensors(folder, names))
    model, _ = surgery.build_shallow(base, "0,-1")
    layer_ids = {int(name.split(".")[2]) for name in requested if name.startswith("model.layers.")}
    assert layer_ids == {0, 5}
    assert "lm_head.weight" not in requested
    assert model.lm_head.weight is model.model.embed_tokens.weight
    surgery.save_shallow(model, {}, base, tmp_path / "shallow")
    with safe_open(tmp_path / "shallow" / "model.safetensors", "pt") as f:
        stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
    assert "lm_head.weight" not in stored
    # The tied head is stored once and counted once.
    assert sum(p.numel() for p in model.parameters()) == sum(int(torch.tensor(shape).prod()) for shape in stored.values())
    full = AutoModelForCausalLM.from_pretrained(base)
    per_layer = sum(p.numel() for p in full.model.layers[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in full.parameters()) - 4 * per_layer
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_dtype_follows_the_checkpoint_tensors_and_merge_casts_back(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16)
    model.save_pretrained(base, safe_serialization=True)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))  # a config that is wrong about it
    built, _ = surgery.build_shallow(base, "0,-1")
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    surgery.detach(base, "0,-1", tmp_path / "shallow")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow", dtype=torch.float32)  # as training loads it on CPU
    with torch.no_grad():
        for p in trained.model.layers.parameters():
            p.add_(0.25)
    trained.save_pretrained(tmp_path / "shallow", safe_serialization=True)
    surgery.merge(base, tmp_path / "shallow", tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert torch.equal(merged["model.layers.4.mlp.up_proj.weight"], trained.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))


def test_merge_streams_a_sharded_base_and_keeps_its_layout(tmp_path):
    base = save_tiny_model(tmp_path / "base", "gpt2", num_layers=5)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(base, max_shard_size="40KB")
    (base / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2
    surgery.detach(base, "1,3", tmp_path / "shallow")
    shallow = AutoModelForCausalLM.from_pretrained(tmp_path / "shallow")
    with torch.no_grad():
        for p in shallow.transformer.h.parameters():
            p.mul_(-1)
    shallow.save_pretrained(tmp_path / "shallow", safe_serialization=True)
    surgery.merge(base, tmp_path / "shallow", tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    assert (tmp_path / "merged" / checkpoint.SAFETENSORS_INDEX).read_bytes() == (base / checkpoint.SAFETENSORS_INDEX).read_bytes()
    for shard in shards:
        before, after = (base / shard).read_bytes(), (tmp_path / "merged" / shard).read_bytes()
        assert len(before) == len(after)
        ranges = checkpoint.tensor_byte_ranges(base / shard)
        assert ranges == checkpoint.tensor_byte_ranges(tmp_path / "merged" / shard)
        header_end = min(start for start, _ in ranges.values())
        assert before[:header_end] == after[:header_end]  # header and metadata untouched
        for name, (start, end) in ranges.items():
            if name.startswith(("transformer.h.1.", "transformer.h.3.")):
                assert before[start:end] != after[start:end], name
            else:
                assert before[start:end] == after[start:end], name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.transformer.h[3].mlp.c_fc.weight, shallow.transformer.h[1].mlp.c_fc.weight)


def test_copy_safetensors_refuses_replacements_that_do_not_fit(tmp_path):
    save_file({"a": torch.zeros(4), "b": torch.ones(2, 3)}, tmp_path / "x.safetensors")
    checkpoint.copy_safetensors(tmp_path / "x.safetensors", tmp_path / "y.safetensors", {"b": lambda: torch.full((2, 3), 7.0)})
    with safe_open(tmp_path / "y.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.zeros(4)) and torch.equal(f.get_tensor("b"), torch.full((2, 3), 7.0))
    with pytest.raises(EloError, match="bytes"):
        checkpoint.copy_safetensors(tmp_path / "x.safetensors", tmp_path / "z.safetensors", {"b": lambda: torch.zeros(2, 4)})
    with pytest.raises(EloError, match="has no tensor"):
        checkpoint.copy_safetensors(tmp_path / "x.safetensors", tmp_path / "z.safetensors", {"c": lambda: torch.zeros(1)})
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EloError, match="not a safetensors file"):
        checkpoint.tensor_byte_ranges(tmp_path / "bad.safetensors")


def test_a_checkpoint_that_does_not_fit_its_config_fails_clearly(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(EloError, match="do not fit its config.json"):
        surgery.detach(base, "0,-1", tmp_path / "shallow")
    (base / "config.json").write_text(json.dumps(config))
    with safe_open(base / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EloError, match=r"lacks weights for \['model.norm.weight'\]"):
        surgery.detach(base, "0,-1", tmp_path / "shallow")
    assert not (tmp_path / "shallow").exists()


def test_an_architecture_without_a_recognisable_layer_list_fails_clearly():
    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = AutoConfig.for_model("llama", num_hidden_layers=2)
            self.encoder = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
            self.decoder = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))

    with pytest.raises(EloError, match="cannot find the decoder layer list of TwoStacks .2 candidate"):
        surgery.find_decoder_layers(TwoStacks())


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
