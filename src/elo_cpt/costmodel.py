"""Analytic cost model of a training step: FLOPs per token and a rough memory estimate, per method.

Per token, the forward pass costs ~2 x the matmul parameters it touches (the decoder layers' linear weights it
runs, plus the LM head; the embedding lookup is free). The backward pass costs ~2x the forward for weights that
train (activation gradient + weight gradient), and ~1x the forward for frozen weights that gradients must flow
through (only above the lowest trainable layer, and the head). Attention-score FLOPs (which grow with the sequence
length) and elementwise work are left out, as in method.md's "Cost model". LoRA is "everything frozen, gradients
flow through every layer, plus small trained adapters".

The module is a leaf: plain arithmetic on a `Shape`, which `Shape.from_config` reads from any dense
decoder-only Hugging Face config (Llama, Mistral, Qwen2, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from elo_cpt.errors import EloError

METHODS = ("elo", "freeze", "lora", "fft", "align")
#: Bytes per trainable parameter besides its weight: fp32 gradient (4) + AdamW's two fp32 moments (8).
TRAIN_STATE_BYTES = 12


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

    @classmethod
    def from_config(cls, config) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
            head_dim = getattr(text, "head_dim", None) or hidden // heads
            return cls(
                num_layers=int(text.num_hidden_layers),
                hidden=hidden,
                intermediate=int(text.intermediate_size),
                heads=heads,
                kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                head_dim=int(head_dim),
                vocab=int(text.vocab_size),
                tied=bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
            )
        except (AttributeError, TypeError) as err:
            raise EloError(f"the cost model needs a dense decoder config (hidden_size, intermediate_size, ...): {err}") from None

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one decoder layer."""
        return sum(a * b for a, b in self.layer_linears())

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of one decoder layer with rank-`rank` LoRA on every linear layer."""
        return sum(rank * (a + b) for a, b in self.layer_linears())

    def total_params(self, num_layers: int | None = None) -> int:
        """Every parameter of a model with `num_layers` decoder layers (all by default): embedding, layers with
        their two norms, final norm, and the head unless tied."""
        n = self.num_layers if num_layers is None else num_layers
        head = 0 if self.tied else self.head_params
        return self.vocab * self.hidden + n * (self.layer_params + 2 * self.hidden) + self.hidden + head


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
    n, per_layer, head = shape.num_layers, shape.layer_params, shape.head_params
    lowest = min(layers)
    # (params, trained, gradient flows through) for each matmul block the step touches
    if method in ("fft", "align"):
        blocks = [(per_layer, True, True)] * n + [(head, True, True)]
        trainable = shape.total_params()
    elif method == "freeze":
        blocks = [(per_layer, i in layers, i > lowest) for i in range(n)] + [(head, False, True)]
        trainable = len(layers) * (per_layer + 2 * shape.hidden)
    elif method == "lora":
        adapters = n * shape.lora_params(lora_rank)
        blocks = [(per_layer, False, True)] * n + [(head, False, True), (adapters, True, True)]
        trainable = adapters
    else:  # elo: only the selected (and frozen emulator) layers are computed
        kept = sorted({*layers, *frozen})
        blocks = [(per_layer, i in layers, i > lowest) for i in kept] + [(head, False, True)]
        trainable = len(layers) * (per_layer + 2 * shape.hidden)
    forward = sum(2.0 * p for p, _, _ in blocks)
    backward = sum(4.0 * p if trained else 2.0 * p if flows else 0.0 for p, trained, flows in blocks)
    return Cost(method, forward, backward, trainable, len({*layers, *frozen}) if method == "elo" else n)


def pipeline_speedup(stage1_rate: float, align_rate: float, fft_rate: float, stage1_share: float = 0.9) -> float:
    """Speedup of ELO (stage 1 on `stage1_share` of T tokens, alignment on the rest) over fft on all T tokens,
    from rates in tokens per unit time (tokens/s measured, or 1/FLOPs per token)."""
    elo_time = stage1_share / stage1_rate + (1 - stage1_share) / align_rate
    return (1 / fft_rate) / elo_time


def estimate_memory_bytes(shape: Shape, method: str, layers: list[int], batch: int, seq: int,
                          loss_chunk: int = 1024, lora_rank: int = 16, dtype_bytes: int = 4) -> dict[str, int]:
    """A rough peak-memory estimate of one training step, without the runtime's own footprint.

    weights (every parameter of the computed model) + trainable x (gradient + AdamW moments, fp32) + saved
    activations (~(10 hidden + 4 intermediate) values per token per computed layer) + logits (batch x seq x vocab,
    about 3 copies: logits, softmax, gradient; one chunk x vocab block with the chunked loss).
    """
    cost = step_cost(shape, method, layers, lora_rank)
    computed = cost.computed_layers
    weights = shape.total_params(computed) * dtype_bytes
    train_state = cost.trainable_params * TRAIN_STATE_BYTES
    tokens = batch * seq
    activations = tokens * computed * (10 * shape.hidden + 4 * shape.intermediate) * dtype_bytes
    logit_rows = min(loss_chunk, tokens) if loss_chunk else tokens
    logits = 3 * logit_rows * shape.vocab * 4
    total = weights + train_state + activations + logits
    return {"weights": weights, "grads_and_optimizer": train_state, "activations": activations, "logits": logits, "total": total}
