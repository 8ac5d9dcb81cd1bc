"""`shardquant plan`: size a run from the model's config.json and the run config alone.

No weight is read and torch is not imported: the numbers are arithmetic over the
config.json values (num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
num_key_value_heads, head_dim, vocab_size, tie_word_embeddings, and the family's linears,
norms and bias keys from its adapter) and the run config. All sizes are bytes; ``d`` is the
byte size of ``model.dtype`` (float32 4, bfloat16/float16 2).

Samples. ``world`` is ``cluster.workers`` with ``cluster.backend: ray``, else 1. The
calibration windows (``calib.n_samples``; none when ``quant.method: none``) and evaluation
windows (``eval.n_samples`` when ``eval.path`` is set and ``eval.enabled``) are split over
the workers in contiguous shares exactly as ``execution.packing.split_range`` does: rank r of
w gets ``n // w`` windows, plus one for the first ``n % w`` ranks. Every rank is planned
with its own share and its own solves; the printed terms are rank 0's (the largest share,
and the largest solve: the packing puts the costliest unit on rank 0) and ``peak`` is the
largest rank's. Exception: ``calib.propagate: fp`` on Ray runs pipeline stages, which split
the blocks (the same way), give every worker every window and solve each block on its stage.

Activations per worker, one stream each (``windows × seq_len × hidden × d``):
``calib`` (calibration), ``calib_next`` (``calib.propagate: fp``: the fp outputs kept beside
the inputs), ``eval_q`` (evaluation through the quantized blocks) and ``eval_fp``
(``eval.fp``: through the original blocks). ``calib_next`` and ``eval_fp`` exist only when
something is quantized. Streams are held in memory up to ``cluster.activation_memory``; the
rest spills to disk (``resident = min(total, cap)``).

Blocks. A mixture-of-experts model's blocks are sparse (its experts' linears and the router)
unless config.json makes them dense (``mlp_only_layers``, ``decoder_sparse_step``): those are
sized as the dense family's block; every kind of block is planned and the largest counts.

Spill traffic (``cluster.spill``), when some of it spills. The store keeps batches in memory in
the order they arrive (``calib``, ``eval_q``, ``eval_fp``, then ``calib_next``), so each
stream's spilled bytes ``S`` are what is left of it once the cap is full. Per block a spilled
byte is read once per observation pass (``P``: one per phase of the solves below for gptq, awq
and awq+gptq, none for rtn) plus once by the propagation (calibration) or the pass through the
block (evaluation) and once more by the activation checkpoint, and written once (the stream's
new batches): ``reads = (P + 2) · S_calib + 2 · (S_eval_q + S_eval_fp)``, ``writes = S`` summed.
With ``calib.propagate: fp`` the calibration stream is read by the passes and the fp
propagation, which writes ``calib_next`` instead (it replaces ``calib`` before the checkpoint):
``reads = (P + 1) · S_calib + S_calib_next + 2 · S_eval``, ``writes = S_calib_next + S_eval``.
The run adds the first write of everything spilled at setup. The time at a disk throughput (``plan --disk-throughput``, 2 GB/s
by default, a local NVMe SSD) is ``(reads + writes) / throughput``: what spilling adds when no
compute hides it (reads go one batch ahead and writes behind, so the compute of each batch
hides up to that batch's I/O).

Solves. A phase is one input group with ``quant.true_sequential`` (gptq, awq, awq+gptq),
otherwise, and always for rtn, the whole block. With several workers a phase's linears are
packed into units exactly as the Ray executor packs them (``execution.packing``: one unit per
linear, a large GPTQ linear in row slices, greedy by cost); one worker solves all, whole.

Memory per worker while one block is worked on (``block phase``):

- ``framework``: the process itself (``FRAMEWORK``): 0.50 GiB for a local process, 0.55 GiB
  for a Ray actor (CPU workers: torch, transformers and shardquant imported, the block's
  skeleton, the allocator's retained frees; measured by benchmarks/plan_accuracy.py), and
  0.50 GiB of CUDA context and allocator slack on a GPU (not measured here).
- ``weights``: the block's tensors in the compute dtype (its linears, norms, biases).
- ``activations``: the resident activations above.
- ``solved_codes``: solved weights are kept until the block is written, every linear's
  uint8 codes, float32 scales and int32 zeros per group and int32 g_idx:
  ``sum(out·in + out·groups·8 + in·4)`` over the block's quantized linears (every worker).
- ``fp32_copies``: float32 copies of the widest unit (``u = rows · in``) the worker solves:
  ``2 · u · 4`` for GPTQ and RTN (the weight and its working or dequantized copy); awq works
  a chunk of rows (``c = 2^24`` elements) at a time, ``(8 · min(u, c) + u / 2) · 4`` (its
  search and clip + RTN solve hold about 8 chunk-sized temporaries: scaled candidates, their
  fake quantization, the clipped target, codes and errors, measured; plus the chunks' codes
  and their concatenation); awq/awq+gptq add the unscaled
  weights of the group being solved, kept on every worker in the compute dtype from its
  scale search to its solve (``max over groups of Σ out·in · d``).
- ``hessians`` (gptq, awq, awq+gptq): every worker accumulates one ``in × in`` float32 matrix
  per group of the phase (``Σ in_g²``). One process: its own part is the running sum, and H is
  formed and factorized in it with one work matrix (``GPTQSolver``; awq's Gram ``X^T X`` for
  its losses): ``Σ in_g² + max in_g²`` over the groups it solves. GPU workers: a part goes to
  the host's object store, and a solving worker adds the parts into a new running sum one at
  a time: ``Σ in_g² + max in_g²`` when it solves in the phase, else ``Σ in_g²``. CPU workers:
  a returned part is serialized into the object store (``3 · Σ in_g²`` at the peak of a worker
  that does not solve: the part, its copy in the store and the serializer's transient;
  measured), and a solving worker maps the groups it solves of every worker's part from the
  store beside their running sum and the work matrix: ``max(3 · Σ in_g², (world + 1) · Σ_mine
  in_g² + max_mine in_g²)``. Times 4 bytes, max over phases. A mixture-of-experts pass holds
  every expert's groups of one kind, or with ``quant.moe_experts_per_pass: n`` those of n
  experts (the shared expert's go with the first n; ``tools.fit`` chooses n for ``auto``).
- ``awq_captures`` (awq, awq+gptq): the captured inputs of the phase's groups and the
  consumer's reference outputs: ``tokens · (Σ in_g + hidden) · d`` with
  ``tokens = calib windows of the share × calib.seq_len``.
- ``stage_cache`` (gptq, awq, awq+gptq with ``quant.true_sequential`` and
  ``calib.reuse_stages``): a block's finished attention outputs and the inputs of its
  o_proj or down_proj, kept between the observation passes so a block costs one forward
  pass: ``tokens · (hidden + max(heads · head_dim, intermediate)) · d``.
- ``block_writing`` (CPU workers, data parallel): the previous block's exported tensors, which
  its state file is written from in the background while this block is worked on (each worker
  writes blocks in turn): the largest block's bytes as the checkpoint below counts them. A GPU
  worker holds them in host memory, and pipeline stages write a block before going on.
- ``workspace``: one forward batch (B = the stream's batch size, capped by its windows,
  T = its seq_len): ``max(B · heads · T² · 4, 2 · B · T · intermediate · d) + B · T · hidden · d``
  on CPU workers (fp32 attention scores of the sdpa math fallback, or the MLP's gate and up
  outputs; plus the batch being produced), and on GPU workers, whose sdpa kernels never hold
  the T × T scores, ``2 · B · T · intermediate · d + B · T · hidden · d``; the larger of the
  calibration and evaluation streams.

A forward batch is gone before a linear is solved, so ``block phase = framework + weights +
activations + solved_codes + awq_captures + stage_cache + block_writing + max(workspace,
fp32_copies + hessians)``. Outside the blocks (embedding at setup, final norm and lm_head for perplexity)
``outside phase = framework + activations + vocab · hidden · d + 2 · eval.seq_len · vocab · 4``
(one window's float32 logits and their log-softmax). ``peak = max(block phase, outside
phase)``, the largest over the ranks. A Ray run's driver holds no weights: ``DRIVER`` (0.45
GiB of host RSS: the Ray client, token windows, AWQ's channel means; measured), and for awq
with clipping ``8 · quant.awq_clip_tokens · max in · 4`` (the clip rows gathered from the
workers and serialized into every solve call; measured).

Checkpoint: the sum of the exported tensors' bytes (safetensors data, without headers,
config or tokenizer), what ``report.json``'s ``export.bytes`` counts. Quantized linears (every
block linear not matched by ``quant.ignore``) take the format's packed tensors, as its layout
in ``shardquant.export.formats`` defines them (the exporter plans the same ones):

- ``fake``: ``out · in · d`` (dequantized floats).
- ``compressed-tensors``: int32 ``out · ceil(in / (32/bits))``, scales ``out · groups · d``,
  shape int64[2], and when asymmetric int32 zero points ``ceil(out / (32/bits)) · groups``.
- ``gptq``: g_idx int32 ``in``, qweight int32 ``in·bits/32 · out``, qzeros int32
  ``groups · out·bits/32``, float16 scales ``groups · out``.
- ``awq``: qweight int32 ``in · out/8``, qzeros int32 ``in/group · out/8``, float16 scales
  ``in/group · out``.

``groups = ceil(in / group_size)``, 1 per channel. Everything else (norms, biases, ignored
linears, embedding, lm_head unless tied) is stored in the compute dtype. A scheme the format
cannot hold gets a note with the exporter's own refusal (the run stops there before
calibration).

``shardquant plan --worker-memory 80GB`` compares the peak with that capacity and prints
FITS or DOES NOT FIT with the margin; the command exits 0 either way (the verdict is data,
``--json`` has it as ``capacity.fits``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardquant.algorithms.counts import n_groups
from shardquant.config import AWQ_METHODS, RunConfig, compute_dtype, parse_size
from shardquant.errors import UserError
from shardquant.execution.packing import assign, pack_units, split_range
from shardquant.export.formats import BlockLinears, get_layout, quantized_linears
from shardquant.model.adapters import Adapter, InputGroup, get_adapter
from shardquant.model.adapters import phases as observation_phases
from shardquant.tools.plan_text import human

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DISK_THROUGHPUT = 2 * 10**9  # bytes per second the spill time is stated at unless told (a local NVMe SSD)
SPILL_ORDER = ("calib", "eval_q", "eval_fp", "calib_next")  # the order the store holds streams in memory


def activation_cap(cfg: RunConfig) -> int | None:
    """`cluster.activation_memory` in bytes; None for no cap (null, or `auto` not yet chosen)."""
    v = cfg.cluster.activation_memory
    return None if v in (None, "auto") else parse_size(v)


# --- the model, from config.json ----------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a config.json of a supported family."""

    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    biased: tuple[str, ...] = ()  # the block linears with a bias (the adapter's bias keys)
    # Mixture of experts (the adapter's `Experts` keys): routed experts per sparse block,
    # an expert's and the shared expert's intermediate sizes, and the blocks that are dense
    # (`Experts.sparse_layer`: mlp_only_layers, decoder_sparse_step), sized as dense.
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: frozenset[int] = frozenset()
    # The adapter's own named sizes (`Adapter.sizes`, e.g. MLA's ranks) and its config keys
    # that decide which tensors a block has (`Adapter.present`): (key, set in config.json).
    sizes: tuple[tuple[str, int], ...] = ()
    options: tuple[tuple[str, bool], ...] = ()

    @property
    def adapter(self) -> Adapter:
        return get_adapter(self.family, config={k: (1 if on else None) for k, on in self.options})

    def dims(self) -> dict[str, int]:
        """The values of the adapter's named sizes (`adapters.Dim`)."""
        return {
            "hidden": self.hidden, "intermediate": self.intermediate, "head_dim": self.head_dim,
            "heads*head_dim": self.heads * self.head_dim, "kv_heads*head_dim": self.kv_heads * self.head_dim,
            "expert_intermediate": self.expert_intermediate, "shared_intermediate": self.shared_intermediate,
            **dict(self.sizes),
        }

    def block_experts(self, index: int | None = None) -> int:
        """Routed experts of block `index` (0 for a dense one; None: a sparse block's)."""
        return 0 if index in self.dense_layers else self.experts

    def groups(self, index: int | None = None) -> tuple[InputGroup, ...]:
        """Block `index`'s input groups (None: a sparse block's, with every expert's)."""
        return self.adapter.block_groups(self.block_experts(index))

    def linears(self, index: int | None = None) -> dict[str, tuple[int, int]]:
        """(out, in) of each quantizable linear of block `index` (None: a sparse block), by
        block-relative name."""
        return dict(_linear_shapes(self, self.block_experts(index)))

    def block_linears(self) -> BlockLinears:
        """Every block's linears (a MoE model's sparse and dense blocks' together), for the
        format checks."""
        shapes = {**self.linears(), **(self.linears(min(self.dense_layers)) if self.dense_layers else {})}
        return BlockLinears(self.adapter.blocks, self.layers, shapes)

    def block_other_numel(self, index: int | None = None) -> int:
        """Elements of block `index`'s tensors other than the linears' weights: norms, biases,
        and a sparse block's router (and shared expert's gate)."""
        dims, lins = self.dims(), self.linears(index)
        router = 0
        if self.block_experts(index):
            spec = self.adapter.experts
            router = self.experts * (self.hidden + (spec is not None and spec.router_bias))
            router += self.hidden if self.shared_intermediate else 0  # + shared gate
        return (sum(dims[d] for _, d in self.adapter.norms) + sum(lins[n][0] for n in self.biased if n in lins)
                + router)

    def block_numel(self, index: int | None = None) -> int:
        return sum(o * i for o, i in self.linears(index).values()) + self.block_other_numel(index)

    def outside_numel(self) -> int:
        """Embedding, final norm, and lm_head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@functools.cache
def _linear_shapes(shape: ModelShape, experts: int) -> tuple[tuple[str, tuple[int, int]], ...]:
    return tuple(shape.adapter.linear_shapes(shape.dims(), experts).items())  # once per shape: MoE blocks are large


def read_model_config(model_path: str | Path) -> dict[str, Any]:
    """model.path/config.json as a dict; UserError (one line) when missing or invalid."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise UserError(f"model.path: '{path}' does not exist (plan needs the model's config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        detail = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UserError(f"model.path: '{path}' is not valid JSON ({detail})") from None
    if not isinstance(raw, dict):
        raise UserError(f"model.path: '{path}' must hold a JSON object, not {type(raw).__name__}")
    return raw


def model_shape(raw: dict[str, Any], *, where: str = "config.json") -> ModelShape:
    """The sizes of a llama/mistral/qwen2/qwen3 config.json; UserError naming a bad key."""
    family = raw.get("model_type")
    adapter = get_adapter(family, key=f"{where}: model_type")

    def num(key: str, default: int | None = None) -> int:
        v = raw.get(key, default)
        if v is None:
            raise UserError(f"{where}: '{key}' is missing")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{where}: '{key}' must be a positive integer (got {v!r})")
        return v

    heads = num("num_attention_heads")
    hidden = num("hidden_size")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise UserError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    moe: dict[str, int] = {}
    spec = adapter.experts
    if spec is not None and spec.count(raw):
        moe = {"experts": spec.count(raw), "expert_intermediate": num(spec.intermediate_key),
               "dense_layers": frozenset(i for i in range(num("num_hidden_layers")) if not spec.sparse_layer(raw, i))}
        if spec.shared_intermediate_key:
            moe["shared_intermediate"] = num(spec.shared_intermediate_key)
    options = {p.key: raw[p.key] is not None if p.key in raw else p.missing_is_set for p in adapter.present}
    try:
        sizes = adapter.resolve(raw).named_sizes(raw)
    except KeyError as e:
        raise UserError(f"{where}: '{e.args[0]}' is missing") from None
    return ModelShape(
        family=family, layers=num("num_hidden_layers"), hidden=hidden, intermediate=num("intermediate_size"),
        heads=heads, kv_heads=num("num_key_value_heads", heads), head_dim=num("head_dim") if raw.get("head_dim") is not None else head_dim,
        vocab=num("vocab_size"), tied=bool(raw.get("tie_word_embeddings", False)),
        biased=adapter.resolve(raw).biased(raw), sizes=tuple(sizes.items()), options=tuple(options.items()), **moe,
    )


# --- the plan -----------------------------------------------------------------------------


def packed_linear_bytes(fmt: str, out_f: int, in_f: int, cfg: RunConfig) -> int:
    """Bytes of one quantized linear's tensors in export format `fmt` (its layout's)."""
    return get_layout(fmt)(cfg.quant, cfg.model.dtype).linear_bytes(out_f, in_f)


def _format_notes(shape: ModelShape, cfg: RunConfig) -> list[str]:
    """What the export format cannot hold: the exporter's own check, which refuses the run
    before calibration with this message."""
    problem = get_layout(cfg.export.format)(cfg.quant, cfg.model.dtype).problem(shape.block_linears())
    return [] if problem is None else [f"the run will refuse this: {problem}"]


@dataclass
class Plan:
    """Every number `shardquant plan` prints (bytes unless named otherwise)."""

    model_path: str
    shape: ModelShape
    cfg: RunConfig
    world: int
    calib_windows: list[int]
    eval_windows: list[int]
    streams: dict[str, int]
    resident: int
    spilled: int
    block_bytes: int
    hessian_group: str | None
    hessian_in: int
    memory: dict[str, int]
    checkpoint_bytes: int
    notes: list[str]
    device: str = "cpu"  # what the workers compute on: 'cuda' (GPU memory) or 'cpu' (host RSS)
    worker_peaks: list[int] = field(default_factory=list)  # each rank's peak (the packing differs)
    driver: int | None = None  # a Ray run's driver process (host RSS)
    spill: dict[str, int] = field(default_factory=dict)  # rank 0's spill traffic (`spill_traffic`)

    def spill_json(self, throughput: int | None = None) -> dict[str, Any] | None:
        """The spill traffic and the seconds it takes at `throughput` bytes/s (None: `DISK_THROUGHPUT`);
        None when nothing spills."""
        if not self.spilled:
            return None
        tp = throughput or DISK_THROUGHPUT
        moved = self.spill["run_read_bytes"] + self.spill["run_written_bytes"]
        return {"mode": self.cfg.cluster.spill, **self.spill, "throughput_bytes_per_s": tp, "seconds": moved / tp}

    @property
    def activation_bytes(self) -> int:
        return sum(self.streams.values())

    @property
    def hessian_bytes(self) -> int:
        return self.hessian_in * self.hessian_in * 4

    @property
    def peak(self) -> int:
        return self.memory["peak"]

    def verdict(self, capacity: int) -> dict[str, Any]:
        """{'bytes', 'fits', 'margin'} against a per-worker memory capacity."""
        return {"bytes": capacity, "fits": self.peak <= capacity, "margin": capacity - self.peak}

    def to_json(self, capacity: int | None = None, throughput: int | None = None) -> dict[str, Any]:
        s, c = self.shape, self.cfg
        return {
            "model": {
                "path": self.model_path, "family": s.family, "blocks": s.layers, "hidden_size": s.hidden,
                "intermediate_size": s.intermediate, "num_attention_heads": s.heads,
                "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab,
                "tie_word_embeddings": s.tied,
            },
            "run": {
                "method": c.quant.method, "bits": c.quant.bits, "group_size": c.quant.group_size,
                "dtype": c.model.dtype, "device": self.device, "export_format": c.export.format, "propagate": c.calib.propagate,
                "backend": c.cluster.backend, "workers": self.world,
            },
            "samples": {
                "calib": {"total": sum(self.calib_windows), "per_worker": self.calib_windows,
                          "seq_len": c.calib.seq_len},
                "eval": {"total": sum(self.eval_windows), "per_worker": self.eval_windows,
                         "seq_len": c.eval.seq_len},
            },
            "activations": {
                "streams": dict(self.streams), "total": self.activation_bytes, "resident": self.resident,
                "spilled": self.spilled,
                "cap": activation_cap(c),
                "spill": self.spill_json(throughput),
            },
            "block_bytes": self.block_bytes,
            "hessian": None if self.hessian_group is None else {
                "group": self.hessian_group, "in_features": self.hessian_in, "bytes": self.hessian_bytes,
            },
            "memory": dict(self.memory),
            "worker_peaks": list(self.worker_peaks),
            "driver": self.driver,
            "checkpoint_bytes": self.checkpoint_bytes,
            "capacity": None if capacity is None else self.verdict(capacity),
            "notes": list(self.notes),
        }


def block_export_bytes(shape: ModelShape, cfg: RunConfig) -> list[int]:
    """Bytes of each block's exported tensors (its state file's data), in block order."""
    d = DTYPE_BYTES[cfg.model.dtype]
    layout = get_layout(cfg.export.format)(cfg.quant, cfg.model.dtype)
    model = shape.block_linears()
    packed: dict[tuple[int, int], int] = {}  # by (out, in): a MoE block has hundreds of each
    out = []
    for i in range(shape.layers):
        shapes = shape.linears(i)
        quantized = set(quantized_linears(cfg.quant, model.blocks, i, list(shapes)))
        total = shape.block_other_numel(i) * d
        for name, (out_f, in_f) in shapes.items():
            if name not in quantized:
                total += out_f * in_f * d
                continue
            if (out_f, in_f) not in packed:
                packed[out_f, in_f] = layout.linear_bytes(out_f, in_f)
            total += packed[out_f, in_f]
        out.append(total)
    return out


def checkpoint_bytes(shape: ModelShape, cfg: RunConfig, blocks: list[int] | None = None) -> int:
    """Bytes of the exported checkpoint's tensors (what report.json's export.bytes counts);
    `blocks`: `block_export_bytes`, when already computed."""
    blocks = block_export_bytes(shape, cfg) if blocks is None else blocks
    return sum(blocks) + shape.outside_numel() * DTYPE_BYTES[cfg.model.dtype]


# In-process footprint beyond the terms (bytes), measured with benchmarks/plan_accuracy.py: an
# idle process importing torch, transformers and shardquant holds 0.24 GiB (a Ray actor 0.29),
# and a run adds ~0.2 GiB (libraries, the block's skeleton and tokenizer, freed tensors the
# allocator keeps). On a GPU: the CUDA context and allocator slack, not measured here.
FRAMEWORK = {"local": 512 * 2**20, "ray": 563 * 2**20, "cuda": 512 * 2**20}
# A Ray run's driver (host RSS): no weight; the Ray client, token windows, AWQ's channel means
# (measured: 0.45 GiB flat in width); awq adds its clip search's rows, gathered from the workers
# and serialized into each solve call (8 copies at the peak, measured).
DRIVER = 461 * 2**20
DRIVER_CLIP_COPIES = 8
AWQ_ROW_CHUNK = 1 << 24  # algorithms.awq.ROW_CHUNK_ELEMENTS: AWQ's per-row work goes in chunks this large


def solve_copies(method: str, unit: int) -> int:
    """Float32 elements a solve of a unit of `unit` elements (rows · in) holds beyond the
    weights and statistics counted elsewhere. GPTQ and RTN: the weight in fp32 and its work
    or dequantized copy (2 units). AWQ goes a chunk of rows at a time: its search and clip +
    RTN solve hold about 8 chunk-sized temporaries (scaled candidates, their fake quantization,
    the clipped target, codes, errors; measured) plus the codes of the chunks and their
    concatenation (half a unit). AWQ's scale search (every worker, awq and awq+gptq) holds the
    8 chunk-sized temporaries of the phase's widest linear."""
    if method == "awq":
        return 8 * min(unit, AWQ_ROW_CHUNK) + unit // 2
    return 2 * unit


def _phase_linears(shape: ModelShape, cfg: RunConfig, index: int) -> list[list[tuple[str, int, list[tuple[int, int]]]]]:
    """Block `index`'s solve phases, each [(group, in_features, [(out, in) of its quantized
    linears])]: the observation passes of `quant.true_sequential` (one group each, a sparse
    block's experts together; not for RTN, which solves a block at once), else all groups."""
    q, lins, blocks = cfg.quant, shape.linears(index), shape.adapter.blocks
    work = []
    groups = {g.name: g for g in shape.groups(index)}
    kept = set(quantized_linears(q, blocks, index, list(lins)))
    for g in groups.values():
        quantized = [lins[n] for n in g.linears if n in kept]
        if quantized:
            work.append((g.name, lins[g.linears[0]][1], quantized))
    per_pass = None if q.moe_experts_per_pass == "auto" else int(q.moe_experts_per_pass)
    return observation_phases(work, lambda w: groups[w[0]], q.true_sequential and q.method != "rtn", per_pass)


def _owners(phase: list[tuple[str, int, list[tuple[int, int]]]], kind: str, world: int, row_split: str
            ) -> list[tuple[int, str, int, int]]:
    """(rank, group, rows, in) of every solve unit of a phase, packed as the Ray executor packs
    them (`execution.packing`); one worker solves everything whole."""
    flat = tuple((g, o, i) for g, _, qs in phase for o, i in qs)
    if world == 1:
        return [(0, g, o, i) for g, o, i in flat]
    return list(_packed(flat, kind, world, row_split))


@functools.cache
def _packed(flat: tuple[tuple[str, int, int], ...], kind: str, world: int, row_split: str
            ) -> tuple[tuple[int, str, int, int], ...]:
    """`_owners` of a phase (the same for every rank, so packed once)."""
    units = pack_units([(kind, o, i) for _, o, i in flat], world, row_split)
    owner = assign([u.cost for u in units], world)
    return tuple(
        (r, flat[u.index][0], (u.rows[1] - u.rows[0]) if u.rows else flat[u.index][1], flat[u.index][2])
        for u, r in zip(units, owner, strict=True)
    )


def _block_terms(shape: ModelShape, cfg: RunConfig, index: int, tokens: int, rank: int, world: int, device: str
                 ) -> dict[str, Any]:
    """Solve-time memory terms of block `index` on worker `rank` of `world`, whose calibration
    share is `tokens` (see the module docstring)."""
    q, d, lins = cfg.quant, DTYPE_BYTES[cfg.model.dtype], shape.linears(index)
    phases = _phase_linears(shape, cfg, index)
    quantized = [lin for p in phases for _, _, qs in p for lin in qs]
    terms: dict[str, Any] = {
        "solved_codes": sum(o * i + o * n_groups(i, q.group_size) * 8 + i * 4 for o, i in quantized),
        "fp32_copies": 0, "hessians": 0, "awq_captures": 0, "stage_cache": 0, "hessian_group": None, "hessian_in": 0,
    }
    if not phases or q.method == "none":
        return terms
    if q.method in ("gptq", *AWQ_METHODS) and q.true_sequential and cfg.calib.reuse_stages is not False:
        tails = max(lins[s.tail][1] for s in shape.adapter.stages if s.tail in lins)  # o_proj's, down_proj's inputs
        terms["stage_cache"] = tokens * (shape.hidden + tails) * d
    statistics = q.method in ("gptq", *AWQ_METHODS)
    for phase in phases:
        units = _owners(phase, q.method, world, cfg.cluster.row_split)
        mine = [(g, rows, i) for r, g, rows, i in units if r == rank]
        widest = max((rows * i for _, rows, i in mine), default=0)
        copies = solve_copies(q.method, widest) if widest else 0
        if q.method in AWQ_METHODS:  # every worker searches the phase's scales on its share
            copies = max(copies, 8 * min(max(o * i for _, _, qs in phase for o, i in qs), AWQ_ROW_CHUNK))
        terms["fp32_copies"] = max(terms["fp32_copies"], copies * 4)
        if q.method in AWQ_METHODS:
            terms["awq_captures"] = max(terms["awq_captures"], tokens * (sum(i for _, i, _ in phase) + shape.hidden) * d)
        if not statistics:
            continue
        every = sum(i * i for _, i, _ in phase)
        solving = {m[0] for m in mine}
        solved = max((i * i for g, i, _ in phase if g in solving), default=0)
        if world == 1:
            held = every + solved  # the own part is the running sum, plus one work (or Gram) matrix
        elif device == "cpu":
            # A part returned to the driver is serialized into the object store (3 copies at
            # the peak: measured); the solving worker adds the groups it solves of every
            # worker's part, mapped from the store, into a new running sum.
            own = sum(i * i for g, i, _ in phase if g in solving)
            held = max(3 * every, (world + 1) * own + solved)
        else:
            held = every + solved  # the store is host memory: on the GPU, the sum and one matrix
        terms["hessians"] = max(terms["hessians"], held * 4)
    if q.method in AWQ_METHODS:  # the unscaled weights of a group, from its search to its solve
        terms["fp32_copies"] += max((sum(o * i for o, i in qs) for p in phases for _, _, qs in p), default=0) * d
    if statistics:
        for p in phases:
            for g, i, _ in p:
                if i > terms["hessian_in"]:
                    terms["hessian_group"], terms["hessian_in"] = g, i
    terms["sum"] = sum(terms[k] for k in ("solved_codes", "fp32_copies", "hessians", "awq_captures", "stage_cache"))
    return terms


def spill_traffic(streams: dict[str, int], cap: int | None, passes: int, layers: int) -> dict[str, int]:
    """Bytes read from and written to the spill files by one worker whose streams are
    `streams` under `cap`, per block and per run, with `passes` observation passes per block
    (see the module docstring); empty when nothing spills."""
    if cap is None or sum(streams.values()) <= cap:
        return {}
    free, spilled = cap, {}
    for name in sorted(streams, key=lambda n: SPILL_ORDER.index(n) if n in SPILL_ORDER else len(SPILL_ORDER)):
        kept = min(streams[name], free)
        free -= kept
        spilled[name] = streams[name] - kept
    evals = spilled.get("eval_q", 0) + spilled.get("eval_fp", 0)
    if "calib_next" in spilled:  # propagate fp: calib_next is written, and replaces calib at the block's end
        reads = (passes + 1) * spilled["calib"] + spilled["calib_next"] + 2 * evals
        writes = spilled["calib_next"] + evals
    else:
        reads = (passes + 2) * spilled.get("calib", 0) + 2 * evals
        writes = sum(spilled.values())
    return {"block_read_bytes": reads, "block_written_bytes": writes,
            "run_read_bytes": layers * reads, "run_written_bytes": (layers + 1) * writes}


def worker_device(cfg: RunConfig, device: str | None = None) -> str:
    """'cuda' or 'cpu': what a worker computes on. `device` (plan's --device) wins; else
    `model.device`; `auto` is cuda when Ray workers reserve GPUs or this machine has an NVIDIA
    GPU (what the run would pick), cpu otherwise."""
    name = device or cfg.model.device
    if name != "auto":
        return "cuda" if name.startswith("cuda") else "cpu"
    if cfg.cluster.backend == "ray" and cfg.cluster.gpus_per_worker > 0:
        return "cuda"
    return "cuda" if any(Path("/proc/driver/nvidia/gpus").glob("*")) else "cpu"


def _driver_bytes(shape: ModelShape, cfg: RunConfig) -> int:
    """A Ray run's driver process: `DRIVER`, plus awq's clip rows (`quant.awq_clip_tokens` rows
    of the widest input, float32) when it clips."""
    q = cfg.quant
    if q.method != "awq" or not q.awq_clip:
        return DRIVER
    widest = max(i for k in (None, *sorted(shape.dense_layers)[:1]) for _, i in shape.linears(k).values())
    return DRIVER + DRIVER_CLIP_COPIES * q.awq_clip_tokens * widest * 4


def plan_run(raw: dict[str, Any], cfg: RunConfig, *, device: str | None = None) -> Plan:
    """The plan of `cfg` for the model described by config.json values `raw`, on workers of
    `device` ('cuda' or 'cpu'; None: `worker_device`)."""
    shape = model_shape(raw, where=f"{cfg.model.path}/config.json")
    dev = worker_device(cfg, device)
    dtype = compute_dtype(cfg.model.dtype, dev)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})
    q, d = cfg.quant, DTYPE_BYTES[cfg.model.dtype]
    world = cfg.cluster.workers if cfg.cluster.backend == "ray" else 1
    notes = _format_notes(shape, cfg)
    if cfg.cluster.backend != "ray" and cfg.cluster.workers > 1:
        notes.append("cluster.backend local runs one worker (cluster.workers applies to ray)")
    quantizing = q.method != "none"
    n_calib = cfg.calib.n_samples if q.needs_calibration else 0  # data-free RTN streams none
    if quantizing and not q.needs_calibration:
        notes.append(f"quant.method rtn{f' ({q.scheme})' if q.scheme else ''} is data-free: no calibration "
                     "windows are read or streamed")
    eval_on = cfg.eval.enabled and cfg.eval.path is not None
    n_eval = 0
    if eval_on:
        if cfg.eval.n_samples is None:
            notes.append("eval.n_samples is null (every window of the text): evaluation streams not counted")
        else:
            n_eval = cfg.eval.n_samples
    staged = cfg.cluster.backend == "ray" and cfg.calib.propagate == "fp" and quantizing
    stage_blocks = shape.layers  # the blocks rank 0 works on
    if staged:
        # Pipeline stages: the model is split, every stage holds every window.
        calib_w, eval_w = [n_calib] * world, [n_eval] * world
        a, b = split_range(shape.layers, world, 0)
        stage_blocks = b - a
        notes.append(
            f"pipeline stages (calib.propagate fp on ray): each worker holds every window and a contiguous range of "
            f"up to {b - a} blocks, and keeps its quantized blocks on local disk for evaluation "
            f"(up to {human((b - a) * max(shape.block_numel(i) for i in range(shape.layers)) * d)})"
        )
    else:
        calib_w = [b - a for a, b in (split_range(n_calib, world, r) for r in range(world))]
        eval_w = [b - a for a, b in (split_range(n_eval, world, r) for r in range(world))]
    nc, ne = calib_w[0], eval_w[0]
    h = shape.hidden

    def streams_of(n_c: int, n_e: int) -> dict[str, int]:
        out: dict[str, int] = {}
        if n_calib:
            out["calib"] = n_c * cfg.calib.seq_len * h * d
            if cfg.calib.propagate == "fp":
                out["calib_next"] = out["calib"]
        if n_e:
            out["eval_q"] = n_e * cfg.eval.seq_len * h * d
            if cfg.eval.fp and quantizing:
                out["eval_fp"] = out["eval_q"]
        return out

    streams = streams_of(nc, ne)
    total = sum(streams.values())
    cap = activation_cap(cfg)
    resident = total if cap is None else min(total, cap)

    def work(b: int, t: int, windows: int) -> int:
        b = min(b, windows)
        if not b:
            return 0
        scores = b * shape.heads * t * t * 4 if dev == "cpu" else 0
        return max(scores, 2 * b * t * shape.intermediate * d) + b * t * h * d

    block_bytes = max(shape.block_numel(i) for i in range(shape.layers)) * d
    framework = FRAMEWORK["cuda" if dev == "cuda" else "ray" if cfg.cluster.backend == "ray" else "local"]

    # Blocks differ only in being dense or sparse and in what `quant.ignore` leaves out: plan
    # one block of each kind.
    kinds: dict[tuple, int] = {}
    for i in range(shape.layers):
        key = (shape.block_experts(i), tuple(quantized_linears(q, shape.adapter.blocks, i, list(shape.linears(i)))))
        kinds.setdefault(key, i)

    def worker_memory(rank: int) -> tuple[dict[str, int], dict[str, Any]]:
        nc_r, ne_r = calib_w[rank], eval_w[rank]
        own = sum(streams_of(nc_r, ne_r).values())
        held = own if cap is None else min(own, cap)
        workspace = max(
            work(cfg.calib.batch_size, cfg.calib.seq_len, nc_r) if quantizing else 0,
            work(cfg.eval.batch_size, cfg.eval.seq_len, ne_r),
        )

        def block_phase(i: int) -> tuple[int, dict[str, Any]]:
            # Pipeline stages solve their own blocks, each as a world of one.
            t = _block_terms(shape, cfg, i, nc_r * cfg.calib.seq_len, 0 if staged else rank, 1 if staged else world,
                             dev)
            t["weights"] = shape.block_numel(i) * d
            t["block_writing"] = writing
            # A forward batch is gone before a linear is solved: the two never coexist.
            return (framework + t["weights"] + held + t["solved_codes"] + t["awq_captures"] + t["stage_cache"]
                    + writing + max(workspace, t["fp32_copies"] + t["hessians"])), t

        phase_bytes, terms = max((block_phase(i) for i in kinds.values()), key=lambda pt: pt[0])
        m = {"framework": framework, "weights": terms["weights"], "activations": held}
        m.update({k: terms[k] for k in ("solved_codes", "fp32_copies", "hessians", "awq_captures", "stage_cache",
                                        "block_writing")})
        m["workspace"] = workspace
        m["block_phase"] = phase_bytes
        m["outside_phase"] = (framework + held + shape.vocab * h * d
                              + (2 * cfg.eval.seq_len * shape.vocab * 4 if ne_r else 0))
        m["peak"] = max(m["block_phase"], m["outside_phase"])
        return m, terms

    # Data parallel, the previous block's state file is written while a block is worked on, by
    # each worker in turn; pipeline stages write theirs before going on.
    exported = block_export_bytes(shape, cfg)
    writing = max(exported) if dev == "cpu" and not staged and quantizing else 0
    per_rank = [worker_memory(r) for r in range(world)]
    memory, terms = per_rank[0]
    statistics = q.method in ("gptq", *AWQ_METHODS)
    passes = max((len(_phase_linears(shape, cfg, i)) for i in kinds.values()), default=0) if statistics else 0
    worker_peaks = [m["peak"] for m, _ in per_rank]
    memory["peak"] = max(worker_peaks)
    return Plan(
        model_path=cfg.model.path, shape=shape, cfg=cfg, world=world, calib_windows=calib_w, eval_windows=eval_w,
        streams=streams, resident=resident, spilled=total - resident, block_bytes=block_bytes,
        hessian_group=terms["hessian_group"], hessian_in=terms["hessian_in"], memory=memory,
        checkpoint_bytes=checkpoint_bytes(shape, cfg, exported), notes=notes, device=dev, worker_peaks=worker_peaks,
        driver=_driver_bytes(shape, cfg) if cfg.cluster.backend == "ray" else None,
        spill=spill_traffic(streams, cap, passes, stage_blocks),
    )


def plan_from_config(cfg: RunConfig, *, device: str | None = None) -> Plan:
    """Read model.path/config.json and plan `cfg` (UserError when it is missing or invalid)."""
    return plan_run(read_model_config(cfg.model.path), cfg, device=device)
