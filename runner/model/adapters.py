"""Architecture adapters: what the pipeline must know about a model family, as data.

An adapter names where the blocks, embedding, final norm, rotary embedding and lm_head live,
which linears share an input (and the op before them), in what order the groups run inside a
block, and which attention mask each layer uses. For sizing without the model (`shardquant
plan`) it also gives each linear's (out, in), the per-block norms and which linears carry a
bias, in named sizes of config.json (`Dim`). Adding a family is adding one entry here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from shardquant.errors import UserError

T = TypeVar("T")

# Sizes of a block's tensors, named after config.json: hidden_size, intermediate_size,
# head_dim, and the attention widths num_attention_heads·head_dim, num_key_value_heads·head_dim;
# for mixture-of-experts blocks an expert's and the shared expert's intermediate sizes (the
# config keys are the adapter's `Experts` record's); for multi-head latent attention (MLA)
# the sizes an adapter spells out in `Adapter.sizes`.
Dim = Literal[
    "hidden", "intermediate", "head_dim", "heads*head_dim", "kv_heads*head_dim",
    "expert_intermediate", "shared_intermediate",
    "q_lora_rank", "kv_lora_rank", "kv_a", "heads*qk_head_dim", "heads*kv_b", "heads*v_head_dim",
]
# A named size as a sum of products of config.json keys, e.g. (("kv_lora_rank",),
# ("qk_rope_head_dim",)) is kv_lora_rank + qk_rope_head_dim.
Size = tuple[tuple[str, ...], ...]


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
    # Consecutive groups with the same non-empty `phase` are observed in one pass (their
    # inputs do not depend on each other: one expert's linears never feed another's).
    phase: str = ""
    # A pass observing this group may end once this submodule has run (instead of just
    # before the group's first linear runs): experts run in a data-dependent order.
    stop_after: str = ""
    # Why AWQ may not fold scales into `prev` ("" when it may), e.g. `prev` also feeds the
    # router and the other experts.
    no_scale: str = ""
    # The routed expert whose linears the group holds (`Experts.groups`), else None.
    expert: int | None = None


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


_SHARED_INPUT = "post_attention_layernorm also feeds the router and the other experts"
SHARED_INPUT = "experts_in"  # the name of AWQ's scale group of a sparse block's input (`Experts.shared_input`)


@dataclass(frozen=True)
class Present:
    """Block tensors (linears, norms) that exist only when config.json's `key` is set (not
    null), or with `when_set=False` only when it is null or absent; e.g. DeepSeek's low-rank
    q_a_proj/q_a_layernorm/q_b_proj with `q_lora_rank`, its q_proj without."""

    key: str
    names: tuple[str, ...]
    when_set: bool = True
    missing_is_set: bool = False  # a config.json without `key` gets transformers' non-null default

    def absent(self, config: Mapping[str, object]) -> tuple[str, ...]:
        """The names that the block of a model with config.json values `config` lacks."""
        is_set = config[self.key] is not None if self.key in config else self.missing_is_set
        return () if is_set == self.when_set else self.names


@dataclass(frozen=True)
class Experts:
    """The routed experts of a mixture-of-experts block, as data.

    transformers 5 holds them fused (`fused_gate_up` [E, 2I, H]: each expert's gate rows then
    its up rows; `fused_down` [E, H, I]); the checkpoint keeps one linear per expert,
    `{module}.{e}.{gate|up|down}.weight`. The skeleton is given the checkpoint's layout
    (`model.experts.checkpoint_layout`), so every name below is a module path of it and of
    the checkpoint at once. `moe` is the sparse-MoE submodule (router, experts, shared
    expert); the router and the shared expert's gate stay unquantized. `replaces` are the
    adapter's dense groups that a MoE block does not have; `shared` are the shared expert's
    groups. A layer is sparse unless config.json lists it in `dense_layers_key` or
    `sparse_step_key` skips it (`(i + 1) % step != 0`); a layer that is not sparse is dense.
    """

    moe: str
    module: str
    router: str
    gate: str
    up: str
    down: str
    count_keys: tuple[str, ...]  # config.json's expert count, under the first of these it has
    intermediate_key: str
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    replaces: tuple[str, ...] = ("mlp_in", "mlp_out")
    shared: tuple[InputGroup, ...] = ()
    shared_intermediate_key: str | None = None
    sparse_step_key: str | None = None
    dense_layers_key: str | None = None
    first_dense_key: str | None = None  # the first config[key] layers are dense (DeepSeek)
    # Unquantized weights besides the router that read the sparse block's input (Qwen2-MoE's
    # shared_expert_gate): AWQ's shared-input scale is folded into their columns too.
    input_readers: tuple[str, ...] = ()
    router_bias: bool = False  # the router has one bias per expert (DeepSeek's e_score_correction_bias)

    def linear(self, expert: int, part: str) -> str:
        """Block-relative name of an expert's linear, e.g. 'block_sparse_moe.experts.3.w1'."""
        return f"{self.module}.{expert}.{part}"

    def groups(self, n_experts: int) -> tuple[InputGroup, ...]:
        """The input groups of a sparse block's MLP in execution order: the shared expert's,
        then every expert's gate/up (one pass), then every down (one pass). Each expert has
        its own statistics: the tokens routed to it (or all, `quant.moe_calibrate_all_experts`)."""
        return _expert_groups(self, n_experts)

    def _groups(self, n_experts: int) -> tuple[InputGroup, ...]:
        ins, outs = [], []
        for g in self.shared:  # the shared expert's gate/up read the block's hidden states
            reads_hidden = g.in_dim == "hidden"
            phase = "moe_in" if reads_hidden else "moe_out"
            (ins if reads_hidden else outs).append(replace(g, phase=phase, stop_after=self.moe))
        for e in range(n_experts):
            ins.append(InputGroup(
                f"expert.{e}.in", "post_attention_layernorm", (self.linear(e, self.gate), self.linear(e, self.up)),
                consumer=f"{self.module}.{e}", in_dim="hidden", out_dims=("expert_intermediate",) * 2,
                phase="moe_in", stop_after=self.moe, no_scale=_SHARED_INPUT, expert=e,
            ))
            outs.append(InputGroup(
                f"expert.{e}.out", self.linear(e, self.up), (self.linear(e, self.down),),
                consumer=self.linear(e, self.down), in_dim="expert_intermediate", out_dims=("hidden",),
                phase="moe_out", stop_after=self.moe, expert=e,
            ))
        return (*ins, *outs)

    def shared_input(self, n_experts: int) -> InputGroup:
        """AWQ's one scale for the sparse block's input (`SHARED_INPUT`): folded from
        post_attention_layernorm into the columns of the router, the `input_readers` and every
        expert's (and the shared expert's) gate/up, so the block's function is unchanged; searched
        on the sparse block's output. It observes at the router (every token, once) and solves
        nothing: each expert's gate/up is solved in its own group, with this scale."""
        members = tuple(n for g in self.groups(n_experts) if g.phase == "moe_in" for n in g.linears)
        return InputGroup(
            SHARED_INPUT, "post_attention_layernorm", (self.router, *self.input_readers, *members),
            consumer=self.moe, in_dim="hidden", phase="moe_in", stop_after=self.moe,
        )

    def count(self, config: Mapping[str, object]) -> int:
        """The number of routed experts in config.json values `config` (0 when absent)."""
        return next((int(config[k] or 0) for k in self.count_keys if k in config), 0)

    def sparse_layer(self, config: Mapping[str, object], index: int) -> bool:
        """Whether block `index` has routed experts, by config.json values `config`."""
        if self.dense_layers_key and index in (config.get(self.dense_layers_key) or ()):
            return False
        if self.first_dense_key and index < int(config.get(self.first_dense_key) or 0):
            return False
        step = config.get(self.sparse_step_key, 1) if self.sparse_step_key else 1
        return self.count(config) > 0 and (index + 1) % int(step or 1) == 0


@functools.cache
def _expert_groups(spec: Experts, n_experts: int) -> tuple[InputGroup, ...]:
    return spec._groups(n_experts)  # built once per (record, count): plan asks for them per block and rank


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
    experts: Experts | None = None  # mixture-of-experts blocks: where the experts are
    # Block submodules the skeleton renames to the checkpoint's names (transformers renames
    # them on load): (transformers' name, the checkpoint's), e.g. ("mlp", "block_sparse_moe").
    renames: tuple[tuple[str, str], ...] = ()
    # Named sizes beyond plan's own (`Dim`), as sums of products of config.json keys.
    sizes: tuple[tuple[Dim, Size], ...] = ()
    # Tensors that depend on config.json (`resolve` drops the absent ones).
    present: tuple[Present, ...] = ()

    def resolve(self, config: Mapping[str, object]) -> Adapter:
        """This adapter for a model with config.json values `config`: the linears and norms
        its blocks lack (`present`) are dropped, and groups left without linears with them."""
        absent = {n for p in self.present for n in p.absent(config)}
        if not absent:
            return self
        groups = []
        for g in self.groups:
            keep = [i for i, n in enumerate(g.linears) if n not in absent]
            if keep:
                groups.append(replace(
                    g, linears=tuple(g.linears[i] for i in keep),
                    out_dims=tuple(g.out_dims[i] for i in keep) if g.out_dims else (),
                    clip_skip=tuple(n for n in g.clip_skip if n not in absent),
                ))
        return replace(
            self, groups=tuple(groups), present=(),
            norms=tuple(nd for nd in self.norms if nd[0] not in absent),
            biases=tuple(replace(b, linears=tuple(n for n in b.linears if n not in absent)) for b in self.biases),
        )

    def named_sizes(self, config: Mapping[str, object]) -> dict[str, int]:
        """The values of the `sizes` this (resolved) adapter's blocks use, for config.json values
        `config` (KeyError naming a missing key)."""
        used = {d for g in self.block_groups(1) for d in (g.in_dim, *g.out_dims)} | {d for _, d in self.norms}
        out = {}
        for name, terms in self.sizes:
            if name not in used:
                continue
            total = 0
            for term in terms:
                prod = 1
                for key in term:
                    if config.get(key) is None:
                        raise KeyError(key)
                    prod *= int(config[key])
                total += prod
            out[name] = total
        return out

    def block_groups(self, n_experts: int = 0) -> tuple[InputGroup, ...]:
        """The input groups of a block: `groups`, or for a block with `n_experts` routed
        experts the groups it keeps and then the experts' (`Experts.groups`)."""
        if not n_experts or self.experts is None:
            return self.groups
        kept = tuple(g for g in self.groups if g.name not in self.experts.replaces)
        return (*kept, *self.experts.groups(n_experts))

    def scale_groups(self, n_experts: int = 0) -> tuple[InputGroup, ...]:
        """Groups that AWQ scales but that solve nothing (their linears are solved in
        `block_groups`): a sparse block's shared input (`Experts.shared_input`)."""
        if not n_experts or self.experts is None:
            return ()
        return (self.experts.shared_input(n_experts),)

    def block_prefix(self, index: int) -> str:
        """Tensor-name prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{self.blocks}.{index}."

    def linears(self, n_experts: int = 0) -> tuple[str, ...]:
        """Every quantizable linear of a block (with `n_experts` routed experts), in order."""
        return tuple(name for g in self.block_groups(n_experts) for name in g.linears)

    def linear_shapes(self, dims: Mapping[str, int], n_experts: int = 0) -> dict[str, tuple[int, int]]:
        """(out, in) of every quantizable linear of a block, in sequential order, given the
        values of the `Dim` names."""
        return {
            name: (dims[out], dims[g.in_dim])
            for g in self.block_groups(n_experts) for name, out in zip(g.linears, g.out_dims, strict=True)
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



def phases(
    items: Sequence[T], group: Callable[[T], InputGroup], true_sequential: bool, experts_per_pass: int | None = None
) -> list[list[T]]:
    """`items` (one per input group, in order) split into observation passes: each group on
    its own with true-sequential order, except that consecutive groups of one `phase` share a
    pass; everything in one pass without it. `experts_per_pass` (true-sequential only): a
    shared pass holds at most that many routed experts' groups (`InputGroup.expert`), the
    experts in order, in as many passes as it takes; the pass's other groups (a shared
    expert's) go with the first. An expert's statistics never depend on another's weights,
    so the passes see what one pass would."""
    if not items:
        return []
    if not true_sequential:
        return [list(items)]
    out: list[list[T]] = []
    for it in items:
        g = group(it)
        if out and g.phase and group(out[-1][-1]).phase == g.phase:
            out[-1].append(it)
        else:
            out.append([it])
    if experts_per_pass is None:
        return out
    return [part for p in out for part in _expert_chunks(p, group, experts_per_pass)]


def _expert_chunks(items: list[T], group: Callable[[T], InputGroup], per_pass: int) -> list[list[T]]:
    experts = [it for it in items if group(it).expert is not None]
    if len(experts) <= per_pass:
        return [items]
    others = [it for it in items if group(it).expert is None]
    chunks = [experts[k:k + per_pass] for k in range(0, len(experts), per_pass)]
    return [others + chunks[0], *chunks[1:]]


def _shared(module: str) -> tuple[InputGroup, ...]:
    """The input groups of a shared expert at block submodule `module` (a gated MLP)."""
    return (
        InputGroup(
            "shared_in", "post_attention_layernorm", (f"{module}.gate_proj", f"{module}.up_proj"),
            consumer=module, in_dim="hidden", out_dims=("shared_intermediate",) * 2, no_scale=_SHARED_INPUT,
        ),
        InputGroup(
            "shared_out", f"{module}.up_proj", (f"{module}.down_proj",), consumer=f"{module}.down_proj",
            in_dim="shared_intermediate", out_dims=("hidden",),
        ),
    )


_QWEN_EXPERTS = dict(
    moe="mlp", module="mlp.experts", router="mlp.gate", gate="gate_proj", up="up_proj", down="down_proj",
    count_keys=("num_experts", "num_local_experts"), intermediate_key="moe_intermediate_size",
    sparse_step_key="decoder_sparse_step", dense_layers_key="mlp_only_layers",
)

# DeepSeek-V3's multi-head latent attention: q from q_a_proj -> q_a_layernorm -> q_b_proj (or
# one q_proj when q_lora_rank is null), keys and values from kv_a_proj_with_mqa (the latent
# and the shared rotary key) -> kv_a_layernorm (on the latent) -> kv_b_proj (each head's
# k_nope then v rows). o_proj reads only kv_b_proj's value rows, so no scale folds there
# (llm-compressor's DeepSeek AWQ mappings leave o_proj out too). The q and k paths are not
# clipped (see above).
_MLA = "self_attn."
_MLA_GROUPS = (
    InputGroup(
        "attn_in", "input_layernorm", (_MLA + "q_a_proj", _MLA + "q_proj", _MLA + "kv_a_proj_with_mqa"),
        consumer="self_attn", clip_skip=(_MLA + "q_a_proj", _MLA + "q_proj", _MLA + "kv_a_proj_with_mqa"),
        in_dim="hidden", out_dims=("q_lora_rank", "heads*qk_head_dim", "kv_a"),
    ),
    InputGroup(
        "q_b", _MLA + "q_a_layernorm", (_MLA + "q_b_proj",), consumer=_MLA + "q_b_proj",
        clip_skip=(_MLA + "q_b_proj",), in_dim="q_lora_rank", out_dims=("heads*qk_head_dim",),
    ),
    InputGroup(
        "kv_b", _MLA + "kv_a_layernorm", (_MLA + "kv_b_proj",), consumer=_MLA + "kv_b_proj",
        in_dim="kv_lora_rank", out_dims=("heads*kv_b",),
    ),
    InputGroup(
        "attn_out", _MLA + "kv_b_proj", (_MLA + "o_proj",), consumer=_MLA + "o_proj",
        in_dim="heads*v_head_dim", out_dims=("hidden",),
        no_scale="self_attn.kv_b_proj's rows interleave each head's keys and values",
    ),
    *_LLAMA_LIKE_GROUPS[2:],  # the first `first_k_dense_replace` layers' dense MLP
)
_MLA_SIZES: tuple[tuple[Dim, Size], ...] = (
    ("q_lora_rank", (("q_lora_rank",),)),
    ("kv_lora_rank", (("kv_lora_rank",),)),
    ("kv_a", (("kv_lora_rank",), ("qk_rope_head_dim",))),
    ("heads*qk_head_dim", (("num_attention_heads", "qk_nope_head_dim"), ("num_attention_heads", "qk_rope_head_dim"))),
    ("heads*kv_b", (("num_attention_heads", "qk_nope_head_dim"), ("num_attention_heads", "v_head_dim"))),
    ("heads*v_head_dim", (("num_attention_heads", "v_head_dim"),)),
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
    # transformers' MixtralDecoderLayer.mlp is the checkpoint's block_sparse_moe.
    "mixtral": Adapter(
        "mixtral", groups=_LLAMA_LIKE_GROUPS,
        stages=(_LLAMA_LIKE_STAGES[0], Stage("block_sparse_moe", "", input_op="post_attention_layernorm")),
        mask_rule="sliding_if_configured", norms=_NORMS, renames=(("mlp", "block_sparse_moe"),),
        experts=Experts(
            moe="block_sparse_moe", module="block_sparse_moe.experts", router="block_sparse_moe.gate",
            gate="w1", up="w3", down="w2", count_keys=("num_local_experts",), intermediate_key="intermediate_size",
        ),
    ),
    "qwen2_moe": Adapter(
        "qwen2_moe", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="layer_types", norms=_NORMS,
        biases=(Biases(_ATTN[:3], "qkv_bias"),),
        experts=Experts(**_QWEN_EXPERTS, shared=_shared("mlp.shared_expert"), input_readers=("mlp.shared_expert_gate",), shared_intermediate_key="shared_expert_intermediate_size"),
    ),
    "qwen3_moe": Adapter(
        "qwen3_moe", groups=_LLAMA_LIKE_GROUPS, stages=_LLAMA_LIKE_STAGES, mask_rule="sliding_if_configured",
        norms=(*_NORMS, ("self_attn.q_norm", "head_dim"), ("self_attn.k_norm", "head_dim")),
        biases=(Biases(_ATTN, "attention_bias"),),
        experts=Experts(**_QWEN_EXPERTS),
    ),
    # Routed experts behind DeepseekV3TopkRouter (sigmoid scores, e_score_correction_bias,
    # group-limited top-k: transformers' own, unquantized), shared experts without a gate,
    # and dense MLPs in the first `first_k_dense_replace` layers.
    "deepseek_v3": Adapter(
        "deepseek_v3", groups=_MLA_GROUPS, stages=_LLAMA_LIKE_STAGES,
        norms=(*_NORMS, (_MLA + "q_a_layernorm", "q_lora_rank"), (_MLA + "kv_a_layernorm", "kv_lora_rank")),
        biases=(Biases((_MLA + "q_a_proj", _MLA + "kv_a_proj_with_mqa", _MLA + "o_proj"), "attention_bias"),),
        sizes=(*_MLA_SIZES, ("shared_intermediate", (("moe_intermediate_size", "n_shared_experts"),))),
        present=(
            # DeepseekV3Config's q_lora_rank defaults to 1536 (set) when config.json leaves it out.
            Present("q_lora_rank", (_MLA + "q_a_proj", _MLA + "q_a_layernorm", _MLA + "q_b_proj"),
                    missing_is_set=True),
            Present("q_lora_rank", (_MLA + "q_proj",), when_set=False, missing_is_set=True),
        ),
        experts=Experts(
            moe="mlp", module="mlp.experts", router="mlp.gate", gate="gate_proj", up="up_proj", down="down_proj",
            count_keys=("n_routed_experts",), intermediate_key="moe_intermediate_size",
            first_dense_key="first_k_dense_replace", router_bias=True,
            shared=_shared("mlp.shared_experts"),
        ),
    ),
}


def get_adapter(
    model_type: str | None, *, key: str = "model.path", config: Mapping[str, object] | None = None
) -> Adapter:
    """The adapter for a config.json `model_type` (resolved for its values `config` when given:
    `Adapter.resolve`), or a UserError listing the supported ones."""
    adapter = ADAPTERS.get(model_type or "")
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise UserError(f"{key}: architecture '{model_type}' is not supported (supported: {supported})")
    return adapter if config is None else adapter.resolve(config)
