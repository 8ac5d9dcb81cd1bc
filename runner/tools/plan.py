"""`shardquant plan`: size a run from the model's config.json and the run config alone.

No weight is read and torch is not imported: the numbers are arithmetic over the
config.json values (num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
num_key_value_heads, head_dim, vocab_size, tie_word_embeddings, and the family's linears,
norms and bias keys from its adapter) and the run config. All sizes are bytes; ``d`` is the
byte size of ``model.dtype`` (float32 4, bfloat16/float16 2).

Samples. ``world`` is ``cluster.workers`` with ``cluster.backend: ray``, else 1. The
calibration windows (``calib.n_samples``; none when ``quant.method: none``) and evaluation
windows (``eval.n_samples`` when ``eval.path`` is set and ``eval.enabled``) are split over
the workers in contiguous shares exactly as ``worker.split_range`` does: rank r of w gets
``n // w`` windows, plus one for the first ``n % w`` ranks. Per-worker figures are those of
rank 0, the largest share. Exception: ``calib.propagate: fp`` on Ray runs pipeline stages,
which split the blocks (the same way) and give every worker every window.

Activations per worker, one stream each (``windows × seq_len × hidden × d``):
``calib`` (calibration), ``calib_next`` (``calib.propagate: fp``: the fp outputs kept beside
the inputs), ``eval_q`` (evaluation through the quantized blocks) and ``eval_fp``
(``eval.fp``: through the original blocks). ``calib_next`` and ``eval_fp`` exist only when
something is quantized. Streams are held in memory up to ``cluster.activation_memory``; the
rest spills to disk (``resident = min(total, cap)``).

Memory per worker while one block is worked on (``block phase``), a deliberately
conservative sum of terms that can be alive together:

- ``weights``: the block's tensors in the compute dtype (its linears, norms, biases).
- ``activations``: the resident activations above.
- ``solved_codes``: solved weights are kept until the block is written, every linear's
  uint8 codes, float32 scales and int32 zeros per group and int32 g_idx:
  ``sum(out·in + out·groups·8 + in·4)`` over the block's quantized linears.
- ``fp32_copies``: the linear being solved in float32 and its working or dequantized copy,
  ``2 · max(out·in) · 4``; awq/awq+gptq add the unscaled weights of the group being solved,
  kept in the compute dtype from its scale search to its solve (``max over groups of
  Σ out·in · d``).
- ``hessians`` (gptq, awq, awq+gptq): a phase is one input group with ``quant.true_sequential``,
  otherwise all groups at once. Every worker accumulates one ``in × in`` float32 matrix per
  group of the phase. The solving worker sums the workers' parts into one running sum, one
  part at a time (in one process the worker's own part is the running sum); then H is formed
  and factorized in that sum's buffer, with one work matrix (``GPTQSolver``), and awq builds
  one Gram matrix ``X^T X`` for its scale search and losses (from the worker's own part, which
  it lets go of before the solve). So ``max over phases of (Σ in_g² + max in_g²) · 4``.
- ``awq_captures`` (awq, awq+gptq): the captured inputs of the phase's groups and the
  consumer's reference outputs: ``tokens · (Σ in_g + hidden) · d`` with
  ``tokens = calib windows of the share × calib.seq_len``.
- ``stage_cache`` (gptq, awq, awq+gptq with ``quant.true_sequential`` and
  ``calib.reuse_stages``): a block's finished attention outputs and the inputs of its
  o_proj or down_proj, kept between the observation passes so a block costs one forward
  pass: ``tokens · (hidden + max(heads · head_dim, intermediate)) · d``.
- ``workspace``: one forward batch (B = the stream's batch size, capped by its windows,
  T = its seq_len): ``max(B · heads · T² · 4, 2 · B · T · intermediate · d) + B · T · hidden · d``
  on CPU workers (fp32 attention scores of the sdpa math fallback, or the MLP's gate and up
  outputs; plus the batch being produced), and on GPU workers, whose sdpa kernels never hold
  the T × T scores, ``2 · B · T · intermediate · d + B · T · hidden · d``; the larger of the
  calibration and evaluation streams.

``block phase = weights + activations + solved_codes + fp32_copies + hessians +
awq_captures + stage_cache + workspace``. Outside the blocks (embedding at setup, final norm and lm_head
for perplexity) ``outside phase = activations + vocab · hidden · d + 2 · eval.seq_len ·
vocab · 4`` (one window's float32 logits and their log-softmax). ``peak = max(block phase,
outside phase)``. The estimate ignores the framework's own footprint (CUDA context,
allocator caching, Python), so leave a margin.

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardquant.algorithms.counts import n_groups
from shardquant.config import AWQ_METHODS, RunConfig, compute_dtype, parse_size
from shardquant.errors import UserError
from shardquant.export.formats import BlockLinears, get_layout, quantized_linears
from shardquant.model.adapters import Adapter, InputGroup, get_adapter
from shardquant.model.adapters import phases as observation_phases
from shardquant.tools.plan_text import human

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SOLVE_COPIES = 1  # in×in float32 matrices beside the running sum: GPTQ's work matrix, AWQ's Gram


def activation_cap(cfg: RunConfig) -> int | None:
    """`cluster.activation_memory` in bytes; None for no cap (null, or `auto` not yet chosen)."""
    v = cfg.cluster.activation_memory
    return None if v in (None, "auto") else parse_size(v)


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous share [start, end) of n items that worker `rank` of `world` owns
    (the split of `worker.split_range`, here without torch)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


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
    # an expert's and the shared expert's intermediate sizes. Every block is sized as sparse.
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @property
    def adapter(self) -> Adapter:
        return get_adapter(self.family)

    def dims(self) -> dict[str, int]:
        """The values of the adapter's named sizes (`adapters.Dim`)."""
        return {
            "hidden": self.hidden, "intermediate": self.intermediate, "head_dim": self.head_dim,
            "heads*head_dim": self.heads * self.head_dim, "kv_heads*head_dim": self.kv_heads * self.head_dim,
            "expert_intermediate": self.expert_intermediate, "shared_intermediate": self.shared_intermediate,
        }

    def groups(self) -> tuple[InputGroup, ...]:
        """A block's input groups (a sparse block's, with every expert's)."""
        return self.adapter.block_groups(self.experts)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each quantizable linear of a block, by block-relative name."""
        return self.adapter.linear_shapes(self.dims(), self.experts)

    def block_linears(self) -> BlockLinears:
        return BlockLinears(self.adapter.blocks, self.layers, self.linears())

    def block_other_numel(self) -> int:
        """Elements of a block's tensors other than the linears' weights: norms and biases."""
        dims, lins = self.dims(), self.linears()
        router = self.experts * self.hidden + (self.hidden if self.shared_intermediate else 0)  # + shared gate
        return sum(dims[d] for _, d in self.adapter.norms) + sum(lins[n][0] for n in self.biased) + router

    def block_numel(self) -> int:
        return sum(o * i for o, i in self.linears().values()) + self.block_other_numel()

    def outside_numel(self) -> int:
        """Embedding, final norm, and lm_head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


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
        moe = {"experts": spec.count(raw), "expert_intermediate": num(spec.intermediate_key)}
        if spec.shared_intermediate_key:
            moe["shared_intermediate"] = num(spec.shared_intermediate_key)
    return ModelShape(
        family=family, layers=num("num_hidden_layers"), hidden=hidden, intermediate=num("intermediate_size"),
        heads=heads, kv_heads=num("num_key_value_heads", heads), head_dim=num("head_dim") if raw.get("head_dim") is not None else head_dim,
        vocab=num("vocab_size"), tied=bool(raw.get("tie_word_embeddings", False)), biased=adapter.biased(raw),
        **moe,
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

    def to_json(self, capacity: int | None = None) -> dict[str, Any]:
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
            },
            "block_bytes": self.block_bytes,
            "hessian": None if self.hessian_group is None else {
                "group": self.hessian_group, "in_features": self.hessian_in, "bytes": self.hessian_bytes,
            },
            "memory": dict(self.memory),
            "checkpoint_bytes": self.checkpoint_bytes,
            "capacity": None if capacity is None else self.verdict(capacity),
            "notes": list(self.notes),
        }


def checkpoint_bytes(shape: ModelShape, cfg: RunConfig) -> int:
    """Bytes of the exported checkpoint's tensors (what report.json's export.bytes counts)."""
    d = DTYPE_BYTES[cfg.model.dtype]
    layout = get_layout(cfg.export.format)(cfg.quant, cfg.model.dtype)
    model = shape.block_linears()
    total = 0
    for i in range(shape.layers):
        quantized = set(model.quantized(cfg.quant, i))
        for name, (out_f, in_f) in model.shapes.items():
            total += layout.linear_bytes(out_f, in_f) if name in quantized else out_f * in_f * d
        total += shape.block_other_numel() * d
    return total + shape.outside_numel() * d


def _block_terms(shape: ModelShape, cfg: RunConfig, index: int, tokens: int) -> dict[str, Any]:
    """Solve-time memory terms of block `index` (see the module docstring)."""
    q, d, lins, blocks = cfg.quant, DTYPE_BYTES[cfg.model.dtype], shape.linears(), shape.adapter.blocks
    work = []  # (group, in_features, [(out, in) of its quantized linears])
    groups = {g.name: g for g in shape.groups()}
    for g in groups.values():
        quantized = [lins[n] for n in quantized_linears(q, blocks, index, g.linears)]
        if quantized:
            work.append((g.name, lins[g.linears[0]][1], quantized))
    phases = observation_phases(work, lambda w: groups[w[0]], q.true_sequential)
    quantized = [lin for _, _, qs in work for lin in qs]
    terms: dict[str, Any] = {
        "solved_codes": sum(o * i + o * n_groups(i, q.group_size) * 8 + i * 4 for o, i in quantized),
        "fp32_copies": 2 * max((o * i for o, i in quantized), default=0) * 4,
        "hessians": 0, "awq_captures": 0, "stage_cache": 0, "hessian_group": None, "hessian_in": 0,
    }
    if work and q.method in ("gptq", *AWQ_METHODS) and q.true_sequential and cfg.calib.reuse_stages is not False:
        tails = max(lins[s.tail][1] for s in shape.adapter.stages if s.tail in lins)  # o_proj's, down_proj's inputs
        terms["stage_cache"] = tokens * (shape.hidden + tails) * d
    if q.method in AWQ_METHODS:
        terms["fp32_copies"] += max((sum(o * i for o, i in qs) for _, _, qs in work), default=0) * d
        terms["awq_captures"] = max(
            (tokens * (sum(i for _, i, _ in p) + shape.hidden) * d for p in phases), default=0
        )
    if q.method in ("gptq", "awq", "awq+gptq"):
        for phase in phases:
            ins = [i for _, i, _ in phase]
            terms["hessians"] = max(terms["hessians"], (sum(i * i for i in ins) + SOLVE_COPIES * max(ins) ** 2) * 4)
        for g, i, _ in work:
            if i > terms["hessian_in"]:
                terms["hessian_group"], terms["hessian_in"] = g, i
    terms["sum"] = sum(terms[k] for k in ("solved_codes", "fp32_copies", "hessians", "awq_captures", "stage_cache"))
    return terms


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
    n_calib = cfg.calib.n_samples if quantizing else 0
    eval_on = cfg.eval.enabled and cfg.eval.path is not None
    n_eval = 0
    if eval_on:
        if cfg.eval.n_samples is None:
            notes.append("eval.n_samples is null (every window of the text): evaluation streams not counted")
        else:
            n_eval = cfg.eval.n_samples
    staged = cfg.cluster.backend == "ray" and cfg.calib.propagate == "fp" and quantizing
    if staged:
        # Pipeline stages: the model is split, every stage holds every window.
        calib_w, eval_w = [n_calib] * world, [n_eval] * world
        a, b = split_range(shape.layers, world, 0)
        notes.append(
            f"pipeline stages (calib.propagate fp on ray): each worker holds every window and a contiguous range of "
            f"up to {b - a} blocks, and keeps its quantized blocks on local disk for evaluation "
            f"(up to {human((b - a) * shape.block_numel() * d)})"
        )
    else:
        calib_w = [b - a for a, b in (split_range(n_calib, world, r) for r in range(world))]
        eval_w = [b - a for a, b in (split_range(n_eval, world, r) for r in range(world))]
    nc, ne = calib_w[0], eval_w[0]
    h = shape.hidden
    calib_bytes = nc * cfg.calib.seq_len * h * d
    eval_bytes = ne * cfg.eval.seq_len * h * d
    streams: dict[str, int] = {}
    if quantizing:
        streams["calib"] = calib_bytes
        if cfg.calib.propagate == "fp":
            streams["calib_next"] = calib_bytes
    if ne:
        streams["eval_q"] = eval_bytes
        if cfg.eval.fp and quantizing:
            streams["eval_fp"] = eval_bytes
    total = sum(streams.values())
    cap = activation_cap(cfg)
    resident = total if cap is None else min(total, cap)

    tokens = nc * cfg.calib.seq_len
    terms = max((_block_terms(shape, cfg, i, tokens) for i in range(shape.layers)), key=lambda t: t["sum"])

    def work(b: int, t: int, windows: int) -> int:
        b = min(b, windows)
        if not b:
            return 0
        scores = b * shape.heads * t * t * 4 if dev == "cpu" else 0
        return max(scores, 2 * b * t * shape.intermediate * d) + b * t * h * d

    workspace = max(
        work(cfg.calib.batch_size, cfg.calib.seq_len, nc) if quantizing else 0,
        work(cfg.eval.batch_size, cfg.eval.seq_len, ne),
    )
    block_bytes = shape.block_numel() * d
    memory = {"weights": block_bytes, "activations": resident}
    memory.update({k: terms[k] for k in ("solved_codes", "fp32_copies", "hessians", "awq_captures", "stage_cache")})
    memory["workspace"] = workspace
    memory["block_phase"] = sum(memory.values())
    memory["outside_phase"] = resident + shape.vocab * h * d + (2 * cfg.eval.seq_len * shape.vocab * 4 if ne else 0)
    memory["peak"] = max(memory["block_phase"], memory["outside_phase"])
    return Plan(
        model_path=cfg.model.path, shape=shape, cfg=cfg, world=world, calib_windows=calib_w, eval_windows=eval_w,
        streams=streams, resident=resident, spilled=total - resident, block_bytes=block_bytes,
        hessian_group=terms["hessian_group"], hessian_in=terms["hessian_in"], memory=memory,
        checkpoint_bytes=checkpoint_bytes(shape, cfg), notes=notes, device=dev,
    )


def plan_from_config(cfg: RunConfig, *, device: str | None = None) -> Plan:
    """Read model.path/config.json and plan `cfg` (UserError when it is missing or invalid)."""
    return plan_run(read_model_config(cfg.model.path), cfg, device=device)
