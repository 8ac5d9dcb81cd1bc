"""Architecture adapters: what the pipeline must know about a model family, as data.

An adapter names where the blocks, embedding, final norm, rotary embedding and lm_head live,
which linears share an input (and the op before them), in what order the groups run inside a
block, and which attention mask each layer uses. Adding a family is adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardquant.errors import UserError


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input tensor; `prev` is the op that produces that input.

    AWQ divides `prev` by per-channel scales (a norm's weight, or a linear's output rows) and
    multiplies the linears' input columns by them. `consumer` is the submodule that takes the
    group's input and whose output measures the scale search's loss (it runs every linear of
    the group). `clip_skip` are linears that AWQ's clip search leaves alone.
    """

    name: str
    prev: str
    linears: tuple[str, ...]
    consumer: str = ""
    clip_skip: tuple[str, ...] = ()


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

    def block_prefix(self, index: int) -> str:
        """Tensor-name prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{self.blocks}.{index}."

    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in sequential order."""
        return tuple(name for g in self.groups for name in g.linears)

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
    ),
    InputGroup("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), consumer="self_attn.o_proj"),
    InputGroup("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), consumer="mlp"),
    InputGroup("mlp_out", "mlp.up_proj", ("mlp.down_proj",), consumer="mlp.down_proj"),
)

_LLAMA_LIKE_STAGES = (
    Stage("self_attn", "self_attn.o_proj", returns_tuple=True, input_op="input_layernorm"),
    Stage("mlp", "mlp.down_proj", input_op="post_attention_layernorm"),
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES),
    "mistral": Adapter(
        "mistral", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="sliding_if_configured"
    ),
    "qwen2": Adapter("qwen2", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types"),
    "qwen3": Adapter("qwen3", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types"),
}


def get_adapter(model_type: str | None, *, key: str = "model.path") -> Adapter:
    """The adapter for a config.json `model_type`, or a UserError listing the supported ones."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise UserError(f"{key}: architecture '{model_type}' is not supported (supported: {supported})")
    return adapter
