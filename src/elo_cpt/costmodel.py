"""Analytic cost model of a training step: FLOPs per token and a rough memory estimate, per method.

Per token, the forward pass costs ~2 x the matmul parameters it touches (the decoder layers' linear weights it
runs, plus the LM head; the embedding lookup is free). The backward pass costs ~2x the forward for weights that
train (activation gradient + weight gradient), and ~1x the forward for frozen weights that gradients must flow
through (only above the lowest trainable layer, and the head). Attention-score FLOPs (which grow with the sequence
length) and elementwise work are left out. LoRA is "everything frozen, gradients flow through every layer, plus
small trained adapters". docs/costmodel.md derives the model and works it through for Llama-3.1-8B and SmolLM2-135M.

Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE) cost what a token passes through: attention, the
router, its `experts_per_token` experts and any shared expert; their weights and optimizer state count every
expert. LoRA counts adapters on the linear layers only (see
`Shape.lora_params`).

The module is a leaf: plain arithmetic on a `Shape`, which `Shape.from_config` reads from any decoder-only
Hugging Face config (Llama, Mistral, Qwen2, Qwen3-MoE, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from elo_cpt.errors import EloError

METHODS = ("elo", "freeze", "lora", "fft", "align")


@dataclass(frozen=True)
class Shape:
    """What the cost model needs to know about a model."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0
    """Experts per mixture-of-experts layer (0: a dense model)."""
    experts_per_token: int = 0
    """Experts each token is routed to."""
    expert_intermediate: int = 0
    """Intermediate size of one expert."""
    shared_intermediate: int = 0
    """Intermediate size of the shared expert every token also passes through (Qwen2-MoE; 0: none)."""
    dense_layers: tuple[int, ...] = ()
    """Layers of a mixture-of-experts model that keep a dense MLP (Qwen's mlp_only_layers, decoder_sparse_step)."""

    @classmethod
    def from_config(cls, config) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
            head_dim = getattr(text, "head_dim", None) or hidden // heads
            layers = int(text.num_hidden_layers)
            experts = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)
            moe = {}
            if experts:
                step = int(getattr(text, "decoder_sparse_step", None) or 1)
                only_mlp = set(getattr(text, "mlp_only_layers", None) or [])
                moe = dict(
                    experts=experts,
                    experts_per_token=int(text.num_experts_per_tok),
                    expert_intermediate=int(getattr(text, "moe_intermediate_size", None) or text.intermediate_size),
                    shared_intermediate=int(getattr(text, "shared_expert_intermediate_size", None) or 0),
                    dense_layers=tuple(i for i in range(layers) if i in only_mlp or (i + 1) % step != 0),
                )
            return cls(
                num_layers=int(text.num_hidden_layers),
                hidden=hidden,
                intermediate=int(text.intermediate_size),
                heads=heads,
                kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                head_dim=int(head_dim),
                vocab=int(text.vocab_size),
                tied=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
                **moe,
            )
        except (AttributeError, TypeError) as err:
            raise EloError(f"the cost model needs a decoder config (hidden_size, intermediate_size, ...): {err}") from None

    def sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` is a mixture-of-experts layer."""
        return self.experts > 0 and layer not in self.dense_layers

    def layer_linears(self, layer: int = 0) -> list[tuple[int, int]]:
        """(in, out) of each linear layer (nn.Linear) of decoder layer `layer`: q, k, v, o, then gate, up, down of
        a dense MLP, or the shared expert's gate, up, down and gate of a mixture-of-experts one (the router and the
        experts are other modules)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        if not self.sparse(layer):
            return attention + [(h, i), (h, i), (i, h)]
        shared = [(h, self.shared_intermediate)] * 2 + [(self.shared_intermediate, h), (h, 1)] if self.shared_intermediate else []
        return attention + shared

    def _moe_params(self, layer: int, experts: int) -> int:
        """The router and `experts` experts of a mixture-of-experts layer; 0 for a dense one."""
        return self.hidden * self.experts + experts * 3 * self.hidden * self.expert_intermediate if self.sparse(layer) else 0

    def layer_params_at(self, layer: int) -> int:
        """Matmul parameters of decoder layer `layer`, every expert counted."""
        return sum(a * b for a, b in self.layer_linears(layer)) + self._moe_params(layer, self.experts)

    def layer_active_params(self, layer: int) -> int:
        """Matmul parameters one token passes through in decoder layer `layer` (its routed experts only)."""
        return sum(a * b for a, b in self.layer_linears(layer)) + self._moe_params(layer, self.experts_per_token)

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one decoder layer (the mean over the layers where they differ)."""
        return round(sum(map(self.layer_params_at, range(self.num_layers))) / self.num_layers)

    @property
    def active_intermediate(self) -> int:
        """MLP intermediate values per token of a typical layer (routed experts plus shared expert for MoE)."""
        if not self.experts or not any(map(self.sparse, range(self.num_layers))):
            return self.intermediate
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def lora_params(self, rank: int, layer: int = 0) -> int:
        """Adapter parameters of decoder layer `layer` with rank-`rank` LoRA on every linear layer (nn.Linear). In a
        mixture-of-experts layer that is attention and the shared expert only; PEFT's `all-linear` also adapts the
        router and the fused experts of some architectures (Mixtral, Qwen3-MoE, depending on its version), so
        LoRA's cost is undercounted there."""
        return sum(rank * (a + b) for a, b in self.layer_linears(layer))

    def total_params(self, num_layers: int | None = None) -> int:
        """Every parameter of a model with `num_layers` decoder layers (all by default): embedding, layers with
        their two norms, final norm, and the head unless tied."""
        n = self.num_layers if num_layers is None else num_layers
        head = 0 if self.tied else self.head_params
        layers = sum(map(self.layer_params_at, range(n))) if n == self.num_layers else n * self.layer_params
        return self.vocab * self.hidden + layers + 2 * n * self.hidden + self.hidden + head


@dataclass
class Cost:
    method: str
    forward_flops: float
    backward_flops: float
    trainable_params: int
    computed_layers: int

    @property
    def flops_per_token(self) -> float:
        return self.forward_flops + self.backward_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_per_token": self.flops_per_token}


def step_cost(shape: Shape, method: str, layers: list[int], lora_rank: int = 16, frozen: list[int] = ()) -> Cost:
    """FLOPs per token of one training step of `method`; `layers` are the absolute indices ELO/freeze train, and
    `frozen` the untrained layers an ELO shallow model also computes (stage1.frozen_layers)."""
    if method not in METHODS:
        raise EloError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    n, active, head = shape.num_layers, shape.layer_active_params, shape.head_params
    lowest = min(layers)
    trained_layers = sum(shape.layer_params_at(i) + 2 * shape.hidden for i in layers)
    # (params a token passes through, trained, gradient flows through) for each matmul block the step touches
    if method in ("fft", "align"):
        blocks = [(active(i), True, True) for i in range(n)] + [(head, True, True)]
        trainable = shape.total_params()
    elif method == "freeze":
        blocks = [(active(i), i in layers, i > lowest) for i in range(n)] + [(head, False, True)]
        trainable = trained_layers
    elif method == "lora":
        adapters = sum(shape.lora_params(lora_rank, i) for i in range(n))
        blocks = [(active(i), False, True) for i in range(n)] + [(head, False, True), (adapters, True, True)]
        trainable = adapters
    else:  # elo: only the selected (and frozen emulator) layers are computed
        kept = sorted({*layers, *frozen})
        blocks = [(active(i), i in layers, i > lowest) for i in kept] + [(head, False, True)]
        trainable = trained_layers
    forward = sum(2.0 * p for p, _, _ in blocks)
    backward = sum(4.0 * p if trained else 2.0 * p if flows else 0.0 for p, trained, flows in blocks)
    return Cost(method, forward, backward, trainable, len({*layers, *frozen}) if method == "elo" else n)


def emulator_flops_per_token(shape: Shape, layers: list[int], gap: tuple[int, int], sources: list[int]) -> float:
    """FLOPs per token of distilling an emulator (stage1.emulator_layers): the teacher's forward pass up to base layer
    b of the removed middle (a, b), the shallow model's forward pass through its layers up to a, and the emulator
    layers' forward and backward pass (their weights train)."""
    a, b = gap
    active = shape.layer_active_params
    return (sum(2.0 * active(i) for i in range(b)) + sum(2.0 * active(i) for i in layers if i <= a)
            + sum(6.0 * active(i) for i in sources))


def pipeline_speedup(stage1_rate: float, align_rate: float, fft_rate: float, stage1_share: float = 0.9) -> float:
    """Speedup of ELO (stage 1 on `stage1_share` of T tokens, alignment on the rest) over fft on all T tokens,
    from rates in tokens per unit time (tokens/s measured, or 1/FLOPs per token)."""
    elo_time = stage1_share / stage1_rate + (1 - stage1_share) / align_rate
    return (1 / fft_rate) / elo_time


#: Optimizers whose state `optimizer_state_bytes` models (config.OPTIMIZERS; docs/training.md's table).
OPTIMIZER_STATES = ("adamw", "adamw_kahan", "adamw_8bit", "adafactor", "galore", "apollo")
#: bitsandbytes quantizes the state of tensors of at least this many elements (its `min_8bit_size`).
BNB_MIN_8BIT = 4096


def trainable_tensors(shape: Shape, method: str, layers: list[int], lora_rank: int = 16) -> list[tuple[str, int, int]]:
    """(kind, rows, cols) of every tensor `method` trains: `linear` (an nn.Linear of a decoder layer, what galore and
    apollo project), `embedding`, `matrix` (head, router, experts, LoRA adapters) or `vector` (norms; cols 1)."""
    h = shape.hidden
    tensors: list[tuple[str, int, int]] = []

    def layer(i: int) -> None:
        tensors.extend(("linear", out, inp) for inp, out in shape.layer_linears(i))
        if shape.sparse(i):
            tensors.append(("matrix", shape.experts, h))
            tensors.extend([("matrix", shape.expert_intermediate, h)] * 3 * shape.experts)
        tensors.extend([("vector", h, 1)] * 2)

    if method in ("fft", "align"):
        tensors.append(("embedding", shape.vocab, h))
        for i in range(shape.num_layers):
            layer(i)
        tensors.append(("vector", h, 1))
        if not shape.tied:
            tensors.append(("matrix", shape.vocab, h))
    elif method == "lora":
        for i in range(shape.num_layers):
            tensors.extend(t for inp, out in shape.layer_linears(i) for t in (("matrix", lora_rank, inp), ("matrix", out, lora_rank)))
    else:  # elo, freeze: the selected layers
        for i in layers:
            layer(i)
    return tensors


def optimizer_state_bytes(tensors: list[tuple[str, int, int]], optimizer: str = "adamw", rank: int = 128,
                          dtype_bytes: int = 4) -> int:
    """Bytes of optimizer state for `tensors` (from `trainable_tensors`), as each optimizer keeps it: AdamW two moments
    in fp32 (torch) or in the weights' dtype plus a Kahan buffer for low-precision weights (torch-optimi); 8-bit AdamW
    one byte per moment of tensors of 4,096+ elements except embeddings (Trainer keeps those 32-bit); Adafactor a row
    and a column per matrix; galore and apollo AdamW moments of rank-`rank` projections of the decoder linears plus
    the projection. Step counters are left out."""
    if optimizer not in OPTIMIZER_STATES:
        raise EloError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")
    total = 0
    for kind, m, n in tensors:
        numel = m * n
        if optimizer == "adamw_kahan":
            total += numel * (2 * dtype_bytes + (dtype_bytes if dtype_bytes < 4 else 0))
        elif optimizer == "adamw_8bit":
            quantized = numel >= BNB_MIN_8BIT and kind != "embedding"  # two uint8 moments, 2 x 256-entry maps, absmax per 256
            total += 2 * numel + 2048 + 8 * -(-numel // 256) if quantized else 8 * numel
        elif optimizer == "adafactor":
            total += 4 * (m + n if n > 1 and m > 1 else numel)
        elif optimizer in ("galore", "apollo") and kind == "linear":
            r = min(rank, m, n)
            total += 4 * r * (2 * max(m, n) + min(m, n))
        else:
            total += 8 * numel
    return total


def estimate_memory_bytes(shape: Shape, method: str, layers: list[int], batch: int, seq: int,
                          loss_chunk: int = 1024, lora_rank: int = 16, dtype_bytes: int = 4,
                          activation_bytes: int | None = None, optimizer: str = "adamw", optimizer_rank: int = 128,
                          checkpointing: bool = False, shards: int = 1, step_in_backward: bool = False) -> dict[str, int]:
    """A peak-memory estimate of one training step (per process), without the runtime's own footprint.

    weights (every parameter of the computed model) + gradients of the trainable ones (in the weights' dtype) +
    optimizer state (`optimizer_state_bytes`) + saved activations (~(10 hidden + 4 intermediate) values per token per
    computed layer; with `checkpointing`, each layer's input plus one layer's full set, recomputed) + logits (batch x
    seq x vocab, about 3 fp32 copies: logits, softmax, gradient; one chunk x vocab block with the chunked loss).
    Weights take `dtype_bytes` each, saved activations `activation_bytes` (default the same; 2 under bf16 autocast).
    `shards` > 1 is FSDP full sharding / ZeRO-3 over that many processes: weights, gradients and optimizer state are
    split, two decoder layers are gathered whole at a time (the one computing and the one prefetched), and the loss
    is not chunked (elo-cpt's engine turns chunking off when parameters are sharded).
    With `step_in_backward` (one process only) each tensor's optimizer steps as soon as its gradient is complete and
    frees it, so gradients count as the largest single trained tensor instead of all of them: the others come and go
    one at a time, and the largest is the one held longest, since a tied embedding/head's gradient starts at the
    head (the first backward step) and completes at the embedding (the last)."""
    if step_in_backward and shards > 1:
        raise EloError("step_in_backward runs on one process only: estimate it with shards 1")
    cost = step_cost(shape, method, layers, lora_rank)
    computed = cost.computed_layers
    weights = shape.total_params(computed) * dtype_bytes
    tensors = trainable_tensors(shape, method, layers, lora_rank)
    gradients = (max(m * n for _, m, n in tensors) if step_in_backward else cost.trainable_params) * dtype_bytes
    state = optimizer_state_bytes(tensors, optimizer, optimizer_rank, dtype_bytes)
    tokens = batch * seq
    per_layer = tokens * (10 * shape.hidden + 4 * shape.active_intermediate) * (activation_bytes or dtype_bytes)
    if checkpointing:
        activations = tokens * computed * shape.hidden * (activation_bytes or dtype_bytes) + per_layer
    else:
        activations = per_layer * computed
    gathered = 0
    if shards > 1:
        weights, gradients, state = -(-weights // shards), -(-gradients // shards), -(-state // shards)
        gathered = 2 * max(map(shape.layer_params_at, range(shape.num_layers))) * dtype_bytes
        loss_chunk = 0
    logit_rows = min(loss_chunk, tokens) if loss_chunk else tokens
    logits = 3 * logit_rows * shape.vocab * 4
    total = weights + gradients + state + activations + logits + gathered
    return {"weights": weights, "gradients": gradients, "optimizer": state, "activations": activations,
            "logits": logits, "gathered": gathered, "total": total}
