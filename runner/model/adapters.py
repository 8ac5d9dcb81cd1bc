"""Architecture adapters: what the pipeline must know about a model family, as data.

An adapter names where the blocks, embedding, final norm, rotary embedding and lm_head live,
which linears share an input (and the op before them), in what order the groups run inside a
block, and which attention mask each layer uses. For sizing without the model (`shardquant
plan`) it also gives each linear's (out, in), the per-block norms and which linears carry a
bias, in named sizes of config.json (`Dim`). Adding a family is adding one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from shardquant.errors import UserError

# Sizes of a block's tensors, named after config.json: hidden_size, intermediate_size,
# head_dim, and the attention widths num_attention_heads·head_dim, num_key_value_heads·head_dim.
Dim = Literal["hidden", "intermediate", "head_dim", "heads*head_dim", "kv_heads*head_dim"]


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input tensor; `prev` is the op that produces that input.

    AWQ divides `prev` by per-channel scales (a norm's weight, or a linear's output rows) and
    multiplies the linears' input columns by them. `consumer` is the submodule that takes the
    group's input and whose output measures the scale search's loss (it runs every linear of
    the group). `clip_skip` are linears that AWQ's clip search leaves alone. `in_dim` is the
    linears' input size and `out_dims` their output sizes, in order (for sizing, see `Dim`).
    """

    name: str
    prev: str
    linears: tuple[str, ...]
    consumer: str = ""
    clip_skip: tuple[str, ...] = ()
    in_dim: Dim = "hidden"
    out_dims: tuple[Dim, ...] = ()


@dataclass(frozen=True)
class Biases:
    """Linears of a block that carry a bias when config.json's `key` is true (default false),
    or always when `key` is None."""

    linears: tuple[str, ...]
    key: str | None = None


@dataclass(frozen=True)
class Stage:
    """A submodule of a block whose output is its last linear's output (`tail`), e.g. the
    attention (o_proj) or the MLP (down_proj); `returns_tuple` when it returns (output, extra).

    Once its linears are quantized its output is fixed, so true-sequential calibration reuses
    it instead of rerunning the block from its input (see `stage_cache`). `input_op` is the
    op whose output only this stage consumes (its norm): skipped while the stage is reused."""

    module: str
    tail: str
    returns_tuple: bool = False
    input_op: str | None = None


@dataclass(frozen=True)
class Adapter:
    """Where things are in a decoder-only family (names relative to the model or a block)."""

    family: str
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    groups: tuple[InputGroup, ...] = ()  # in execution order: a forward reaches them in this order
    stages: tuple[Stage, ...] = ()  # submodules ending in one linear, in execution order
    # "full": causal everywhere; "sliding_if_configured": config.sliding_window for every layer
    # when set; "layer_types": per layer from config.layer_types.
    mask_rule: Literal["full", "sliding_if_configured", "layer_types"] = "full"
    norms: tuple[tuple[str, Dim], ...] = ()  # a block's norm weights and their sizes
    biases: tuple[Biases, ...] = ()

    def block_prefix(self, index: int) -> str:
        """Tensor-name prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{self.blocks}.{index}."

    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in sequential order."""
        return tuple(name for g in self.groups for name in g.linears)

    def linear_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """(out, in) of every quantizable linear of a block, in sequential order, given the
        values of the `Dim` names."""
        return {
            name: (dims[out], dims[g.in_dim])
            for g in self.groups for name, out in zip(g.linears, g.out_dims, strict=True)
        }

    def biased(self, config: Mapping[str, object]) -> tuple[str, ...]:
        """The linears of a block with a bias, for config.json values `config`."""
        return tuple(
            name for b in self.biases if b.key is None or bool(config.get(b.key, False)) for name in b.linears
        )

    def mask_type(self, config: object, index: int) -> str:
        """'full_attention' or 'sliding_attention' for block `index`."""
        if self.mask_rule == "layer_types":
            types = getattr(config, "layer_types", None)
            return types[index] if types else "full_attention"
        if self.mask_rule == "sliding_if_configured" and getattr(config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"


# q/k are not clipped: their error is amplified through softmax(q k^T), which the clip
# search's per-linear objective does not see (AutoAWQ skips them for the same reason).
_LLAMA_LIKE_GROUPS = (
    InputGroup(
        "attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        consumer="self_attn", clip_skip=("self_attn.q_proj", "self_attn.k_proj"),
        in_dim="hidden", out_dims=("heads*head_dim", "kv_heads*head_dim", "kv_heads*head_dim"),
    ),
    InputGroup(
        "attn_out", "self_attn.v_proj", ("self_attn.o_proj",), consumer="self_attn.o_proj",
        in_dim="heads*head_dim", out_dims=("hidden",),
    ),
    InputGroup(
        "mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), consumer="mlp",
        in_dim="hidden", out_dims=("intermediate", "intermediate"),
    ),
    InputGroup(
        "mlp_out", "mlp.up_proj", ("mlp.down_proj",), consumer="mlp.down_proj",
        in_dim="intermediate", out_dims=("hidden",),
    ),
)
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS: tuple[tuple[str, Dim], ...] = (("input_layernorm", "hidden"), ("post_attention_layernorm", "hidden"))

_LLAMA_LIKE_STAGES = (
    Stage("self_attn", "self_attn.o_proj", returns_tuple=True, input_op="input_layernorm"),
    Stage("mlp", "mlp.down_proj", input_op="post_attention_layernorm"),
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(
        "llama", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, norms=_NORMS,
        biases=(Biases(_ATTN, "attention_bias"), Biases(_MLP, "mlp_bias")),
    ),
    "mistral": Adapter(
        "mistral", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="sliding_if_configured",
        norms=_NORMS,
    ),
    "qwen2": Adapter(
        "qwen2", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types", norms=_NORMS,
        biases=(Biases(_ATTN[:3]),),  # q, k, v always; o never
    ),
    "qwen3": Adapter(
        "qwen3", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types",
        norms=(*_NORMS, ("self_attn.q_norm", "head_dim"), ("self_attn.k_norm", "head_dim")),
        biases=(Biases(_ATTN, "attention_bias"),),
    ),
    # Llama's layout; the layers in config.no_rope_layers skip rotary inside their own attention.
    "smollm3": Adapter(
        "smollm3", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types", norms=_NORMS,
        biases=(Biases(_ATTN, "attention_bias"), Biases(_MLP, "mlp_bias")),
    ),
}


def get_adapter(model_type: str | None, *, key: str = "model.path") -> Adapter:
    """The adapter for a config.json `model_type`, or a UserError listing the supported ones."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise UserError(f"{key}: architecture '{model_type}' is not supported (supported: {supported})")
    return adapter
