"""What each `export.format` stores, without torch: the one definition of a format's layout
that its exporter writes and that `shardquant plan` and `shardquant inspect` read.

A `Layout` says, for one quantized linear, which tensors stand for it (name suffixes,
safetensors dtypes, shapes, so its bytes); which schemes and models the format can hold (the
exporter raises the first problem before calibration, plan prints it as a note); how a
checkpoint's `quantization_config` declares the scheme; and which tensors inspect looks for
and how it reads a linear's shape back from them. The torch side (turning solved weights into
those tensors, config.json) is in `compressed.py`, `gptq.py` and `awq.py`, whose docstrings
describe each layout in prose.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from shardquant.algorithms.counts import AWQ_BITS, PACK_BITS, n_groups, words
from shardquant.config import GPTQ_METHODS, QuantConfig, is_ignored
from shardquant.errors import UserError

ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1}
FLOAT_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # model.dtype -> safetensors


@dataclass(frozen=True)
class Part:
    """One tensor of a quantized linear `<name>`: `<name>.<suffix>`, a safetensors dtype, a shape."""

    suffix: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_BYTES[self.dtype]


@dataclass(frozen=True)
class Scheme:
    """The weight scheme a checkpoint declares (None where it does not say)."""

    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    act_order: bool | None = None
    kind: str | None = None  # float formats: fp8, nvfp4, mxfp4 (None: integer)
    activations: str | None = None  # how input activations are quantized (None: they are not)

    def describe(self) -> str:
        if self.bits is None:
            return "-"
        inputs = f", inputs {self.activations}" if self.activations else ""
        if self.kind is not None:
            group = {-1: "per channel", 0: "per tensor", None: "group unknown"}.get(
                self.group_size, f"group {self.group_size}")
            order = {True: "act-order", False: "no act-order", None: "act-order unknown"}[self.act_order]
            return f"{self.kind} ({self.bits}-bit float), {group}, {order}{inputs}"
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        sym = {True: "symmetric", False: "asymmetric", None: "symmetry unknown"}[self.symmetric]
        order = {True: "act-order", False: "no act-order", None: "act-order unknown"}[self.act_order]
        return f"{self.bits}-bit, {group}, {sym}, {order}{inputs}"


def describe_inputs(args: object) -> str | None:
    """compressed-tensors' `input_activations` args (a dict) in words, e.g. 'fp8 dynamic per
    token', 'int8 static per tensor', 'fp4 dynamic per group of 16 (static global scale)'."""
    if not isinstance(args, dict):
        return None
    bits = args.get("num_bits")
    kind = f"int{bits}" if args.get("type") == "int" else f"fp{bits}"
    dynamic = args.get("dynamic")
    how = "static" if dynamic is False else "dynamic"
    strategy = args.get("strategy")
    per = {"token": "per token", "tensor": "per tensor", "channel": "per channel"}.get(
        str(strategy), f"per group of {args.get('group_size')}")
    tail = " (static global scale)" if dynamic == "local" else ""
    return f"{kind} {how} {per}{tail}"


def quantized_linears(quant: QuantConfig, blocks: str, index: int, names: Sequence[str]) -> list[str]:
    """The block-relative `names` of block `index` that get quantized (not `quant.ignore`d)."""
    if quant.method == "none":
        return []
    return [n for n in names if not is_ignored(f"{blocks}.{index}.{n}", quant.ignore)]


@dataclass(frozen=True)
class BlockLinears:
    """What the format checks need of a model: the blocks' prefix and count, and the (out, in)
    of each quantizable linear of a block by block-relative name, in model order."""

    blocks: str
    count: int
    shapes: dict[str, tuple[int, int]]

    def quantized(self, quant: QuantConfig, index: int) -> list[str]:
        return quantized_linears(quant, self.blocks, index, list(self.shapes))

    def kept(self, quant: QuantConfig) -> list[str]:
        """Full names of the block linears left in full precision, in model order."""
        return [
            f"{self.blocks}.{i}.{n}" for i in range(self.count)
            for n in self.shapes if n not in self.quantized(quant, i)
        ]


class Layout:
    """A format's layout for the scheme `quant`, floats in the compute dtype `dtype`
    (a `model.dtype` name)."""

    name: ClassVar[str] = ""
    # inspect: the tensor that marks a quantized linear (None: not a packed format), every
    # tensor of one, the scales tensor and its groups dim, a tensor holding (out, in) if any.
    marker: ClassVar[str | None] = None
    siblings: ClassVar[tuple[str, ...]] = ()
    scales: ClassVar[str] = ""
    groups_dim: ClassVar[int] = 0
    shape_tensor: ClassVar[str | None] = None
    marker_dtype: ClassVar[str | None] = None  # the marker's safetensors dtype, where it tells (fp8 `weight`)

    def __init__(self, quant: QuantConfig, dtype: str = "float32"):
        self.quant = quant
        self.dtype = FLOAT_ST[dtype]

    def parts(self, out_f: int, in_f: int) -> list[Part]:
        """The tensors that stand for a quantized [out_f, in_f] linear."""
        raise NotImplementedError

    def linear_bytes(self, out_f: int, in_f: int) -> int:
        return sum(p.nbytes for p in self.parts(out_f, in_f))

    def problems(self, model: BlockLinears) -> Iterator[str]:
        """Why this format cannot hold the scheme for `model`, most basic first (a later
        check may assume the earlier ones passed, so only the first is meaningful)."""
        return iter(())

    def problem(self, model: BlockLinears) -> str | None:
        """The first problem: what the exporter refuses the run with."""
        return next(iter(self.problems(model)), None)

    @classmethod
    def declared_scheme(cls, qc: dict) -> Scheme:
        """The scheme a `quantization_config` of this format declares."""
        return Scheme()

    @classmethod
    def reader(cls, qc: dict) -> type[Layout]:
        """The layout inspect reads a checkpoint of this format with (its config may pick one)."""
        return cls

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        """(out, in) of a linear from its marker tensor's 2-D shape."""
        raise NotImplementedError


class FakeLayout(Layout):
    """`fake`: a quantized linear stays one `weight` in the compute dtype (dequantized)."""

    name = "fake"

    def parts(self, out_f: int, in_f: int) -> list[Part]:
        return [Part("weight", self.dtype, (out_f, in_f))]


class PackedLayout(Layout):
    """Base of the packed formats: they need quantized weights."""

    float_kinds: ClassVar[tuple[str, ...]] = ()  # float weight formats (quant.scheme) it holds
    holds_activations: ClassVar[bool] = False  # whether it can declare input activation quantization

    def problems(self, model: BlockLinears) -> Iterator[str]:
        if self.quant.method == "none":
            yield (
                f"export.format: '{self.name}' needs quantized weights, but quant.method is 'none'; "
                "use export.format: fake"
            )
        if self.quant.kind != "int" and self.quant.kind not in self.float_kinds:
            yield (
                f"export.format: '{self.name}' holds integer weights only, not quant.scheme "
                f"{self.quant.scheme}; use export.format: compressed-tensors or fake"
            )
        if self.quant.activations and not self.holds_activations:
            yield (
                f"export.format: '{self.name}' holds weight-only schemes, but quant.scheme {self.quant.scheme} "
                "also quantizes input activations; use export.format: compressed-tensors, or quant.weights_only"
            )


class CompressedTensorsLayout(PackedLayout):
    """`compressed-tensors` pack-quantized: `weight_packed` int32 [out, words(in)], `weight_scale`
    [out, groups] in the compute dtype, `weight_shape` int64 [2], and when asymmetric
    `weight_zero_point` int32 [words(out), groups]."""

    name = "compressed-tensors"
    marker = "weight_packed"
    siblings = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    scales = "weight_scale"
    groups_dim = 1
    shape_tensor = "weight_shape"
    float_kinds = ("fp8", "nvfp4", "mxfp4")
    holds_activations = True

    def parts(self, out_f: int, in_f: int) -> list[Part]:
        return [*self.weight_parts(out_f, in_f), *input_parts(self.quant, self.dtype)]

    def weight_parts(self, out_f: int, in_f: int) -> list[Part]:
        q = self.quant
        if q.kind != "int":
            return float_parts(q, self.dtype, out_f, in_f)
        groups = n_groups(in_f, q.group_size)
        if q.activations:  # int-quantized (the library's format for W8A8, W4AFP8): one int8 per weight
            return [Part("weight", "I8", (out_f, in_f)), Part("weight_scale", self.dtype, (out_f, groups))]
        parts = [
            Part("weight_packed", "I32", (out_f, words(in_f, q.bits))),
            Part("weight_scale", self.dtype, (out_f, groups)),
            Part("weight_shape", "I64", (2,)),
        ]
        if not q.symmetric:
            parts.append(Part("weight_zero_point", "I32", (words(out_f, q.bits), groups)))
        return parts

    def problems(self, model: BlockLinears) -> Iterator[str]:
        yield from super().problems(model)
        q = self.quant
        if q.bits not in PACK_BITS:
            yield (
                f"export.format: 'compressed-tensors' cannot hold quant.bits={q.bits}: its "
                "pack-quantized layout is stable across library versions only for 2, 4 and 8 bits "
                "(vLLM serves 4 and 8)"
            )
        if q.method in GPTQ_METHODS and q.act_order and q.group_size != -1 and not q.static_groups:
            yield (
                f"export.format: 'compressed-tensors' cannot hold quant.act_order groups at "
                f"quant.group_size={q.group_size} (they need a g_idx, which compressed-tensors "
                "removed); set quant.static_groups: true, or use export.format: gptq"
            )

    @classmethod
    def declared_scheme(cls, qc: dict) -> Scheme:
        w = _first_weights(qc)
        group = {"channel": -1, "tensor": 0}.get(str(w.get("strategy")), w.get("group_size"))
        if w.get("strategy") == "block" and isinstance(w.get("block_structure"), list):
            group = w["block_structure"][-1]
        kind = _float_kind(w)
        return Scheme(w.get("num_bits"), group, w.get("symmetric"), bool(w.get("actorder")), kind,
                      describe_inputs(_first_group(qc).get("input_activations")))

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        return marker[0], marker[1] * 32 // bits

    @classmethod
    def reader(cls, qc: dict) -> type[Layout]:
        """The layout that reads a checkpoint with this `quantization_config` (its `format`)."""
        return {"float-quantized": CTFloat8Reader, "naive-quantized": CTFloat8Reader, "int-quantized": CTInt8Reader,
                "nvfp4-pack-quantized": CTFP4Reader, "mxfp4-pack-quantized": CTFP4Reader}.get(
            str(qc.get("format")), cls)


# compressed-tensors' format for each float kind (the library's own `infer_module_format` of a
# weight-only scheme: tests/test_export_float.py checks it).
CT_FLOAT_FORMATS = {"fp8": "naive-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def float_parts(q: QuantConfig, dtype: str, out_f: int, in_f: int) -> list[Part]:
    """compressed-tensors' tensors of a float-quantized linear: fp8 `weight` with `weight_scale`
    [out, 1] or [blocks of rows, blocks of columns] in the compute dtype; FP4 two E2M1 codes per
    uint8 `weight_packed` [out, in/2] with FP8 `weight_scale` [out, in/16] and a float32
    `weight_global_scale` [1] (NVFP4), or E8M0 uint8 `weight_scale` [out, in/32] (MXFP4)."""
    p = q.weight_preset
    if q.kind == "fp8":
        if p is not None and p.strategy == "block":
            shape = (-(-out_f // p.block_rows), -(-in_f // p.group_size))
        elif p is not None and p.strategy == "tensor":
            shape = (1,)
        else:
            shape = (out_f, 1)
        return [Part("weight", "F8_E4M3", (out_f, in_f)), Part("weight_scale", dtype, shape)]
    groups = n_groups(in_f, q.group_size)
    parts = [Part("weight_packed", "U8", (out_f, -(-in_f // 2)))]
    if q.kind == "nvfp4":
        return [*parts, Part("weight_scale", "F8_E4M3", (out_f, groups)), Part("weight_global_scale", "F32", (1,))]
    return [*parts, Part("weight_scale", "U8", (out_f, groups))]


def input_parts(q: QuantConfig, dtype: str) -> list[Part]:
    """A linear's calibrated input tensors (static input quantization): FP8's `input_scale` [1]
    in the compute dtype, NVFP4's float32 `input_global_scale` [1]; none for dynamic inputs."""
    p = q.weight_preset
    if p is None or not q.activations:
        return []
    return [Part(n, "F32" if n == "input_global_scale" else dtype, (1,)) for n in p.input_params]


def _first_group(qc: dict) -> dict:
    groups = qc.get("config_groups")
    first = next(iter(groups.values()), None) if isinstance(groups, dict) and groups else None
    return first if isinstance(first, dict) else {}


def _first_weights(qc: dict) -> dict:
    w = _first_group(qc).get("weights")
    return w if isinstance(w, dict) else {}


def _float_kind(w: dict) -> str | None:
    if w.get("type") != "float":
        return None
    if w.get("num_bits") == 8:
        return "fp8"
    return "mxfp4" if w.get("group_size") == 32 else "nvfp4"


class CTFloat8Reader(CompressedTensorsLayout):
    """inspect: compressed-tensors fp8 weights (`float-quantized`/`naive-quantized`): the marker
    is the F8_E4M3 `weight` itself."""

    marker = "weight"
    marker_dtype = "F8_E4M3"
    siblings = ("weight", "weight_scale", "input_scale")
    shape_tensor = None

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        return marker[0], marker[1]


class CTInt8Reader(CTFloat8Reader):
    """inspect: compressed-tensors `int-quantized` (W8A8, W4AFP8): one int8 `weight` per weight."""

    marker_dtype = "I8"
    siblings = ("weight", "weight_scale", "weight_zero_point", "input_scale")


class CTFP4Reader(CompressedTensorsLayout):
    """inspect: compressed-tensors NVFP4/MXFP4: two E2M1 codes per uint8 of `weight_packed`."""

    siblings = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    shape_tensor = None

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        return marker[0], marker[1] * 2


class GPTQLayout(PackedLayout):
    """GPTQ v1: `g_idx` int32 [in], `qweight` int32 [in·bits/32, out], `qzeros` int32
    [groups, out·bits/32], `scales` float16 [groups, out]."""

    name = "gptq"
    marker = "qweight"
    siblings = ("qweight", "qzeros", "scales", "g_idx")
    scales = "scales"
    groups_dim = 0

    def parts(self, out_f: int, in_f: int) -> list[Part]:
        q = self.quant
        groups = n_groups(in_f, q.group_size)
        return [
            Part("g_idx", "I32", (in_f,)),
            Part("qweight", "I32", (in_f * q.bits // 32, out_f)),
            Part("qzeros", "I32", (groups, out_f * q.bits // 32)),
            Part("scales", "F16", (groups, out_f)),
        ]

    def problems(self, model: BlockLinears) -> Iterator[str]:
        yield from super().problems(model)
        q = self.quant
        if q.bits not in PACK_BITS:
            yield f"export.format: 'gptq' cannot hold quant.bits={q.bits} (2, 4 or 8)"
        if not q.symmetric:
            yield (
                "export.format: 'gptq' cannot hold quant.symmetric=false (v1 stores zero - 1, so a "
                "zero point of 0 does not survive); use symmetric or export.format: compressed-tensors"
            )
        per = 32 // q.bits
        for name, (out_f, in_f) in model.shapes.items():
            if in_f % per or out_f % per:
                yield (
                    f"export.format: 'gptq' packs {per} codes per int32 word, but {name} is "
                    f"[{out_f}, {in_f}] (both sizes must be multiples of {per} at quant.bits={q.bits})"
                )
        kept = model.kept(q)
        if kept:
            yield (
                f"export.format: 'gptq' cannot leave block linears in full precision "
                f"(quant.ignore matches {kept[0]}); use export.format: compressed-tensors"
            )

    @classmethod
    def declared_scheme(cls, qc: dict) -> Scheme:
        return Scheme(qc.get("bits"), qc.get("group_size"), qc.get("sym"), qc.get("desc_act"))

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        return marker[1], marker[0] * 32 // bits


class AWQLayout(PackedLayout):
    """AWQ GEMM: `qweight` int32 [in, out/8], `qzeros` int32 [in/group, out/8], `scales`
    float16 [in/group, out]."""

    name = "awq"
    marker = "qweight"
    siblings = ("qweight", "qzeros", "scales")
    scales = "scales"
    groups_dim = 0

    def parts(self, out_f: int, in_f: int) -> list[Part]:
        g = self.quant.group_size
        groups = in_f // g if g > 0 else 1  # in / group: a held scheme divides in (see problems)
        return [
            Part("qweight", "I32", (in_f, out_f // 8)),
            Part("qzeros", "I32", (groups, out_f // 8)),
            Part("scales", "F16", (groups, out_f)),
        ]

    def problems(self, model: BlockLinears) -> Iterator[str]:
        yield from super().problems(model)
        q = self.quant
        if q.bits != AWQ_BITS:
            yield (
                f"export.format: 'awq' cannot hold quant.bits={q.bits} (AWQ GEMM is 4-bit only); "
                "use export.format: compressed-tensors or gptq"
            )
        if q.group_size == -1:
            yield (
                "export.format: 'awq' cannot hold quant.group_size=-1 (per channel: vLLM's AWQ needs "
                "a positive group size); use e.g. quant.group_size: 128 or export.format: compressed-tensors"
            )
        if q.method in GPTQ_METHODS and q.act_order and not q.static_groups:
            yield (
                "export.format: 'awq' cannot hold quant.act_order groups (AWQ has no g_idx); set "
                "quant.static_groups: true, or use export.format: gptq"
            )
        quantized = set(model.quantized(q, 0))
        for name, (out_f, in_f) in model.shapes.items():
            if name in quantized and (out_f % 8 or in_f % q.group_size):
                yield (
                    f"export.format: 'awq' packs 8 codes per int32 word along the outputs, but {name} "
                    f"is [{out_f}, {in_f}] (out must be a multiple of 8, in of quant.group_size={q.group_size})"
                )

    @classmethod
    def declared_scheme(cls, qc: dict) -> Scheme:
        # Zero points are always stored (a symmetric scheme is written as zero point 8).
        return Scheme(qc.get("bits"), qc.get("group_size"), not qc.get("zero_point", True), False)

    @classmethod
    def linear_shape(cls, marker: tuple[int, ...], bits: int) -> tuple[int, int]:
        return marker[1] * 32 // bits, marker[0]


LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (FakeLayout, CompressedTensorsLayout, GPTQLayout, AWQLayout)
}
PACKED = {name: cls for name, cls in LAYOUTS.items() if cls.marker is not None}


def get_layout(fmt: str) -> type[Layout]:
    """The layout of `export.format` `fmt` (UserError listing the available ones)."""
    cls = LAYOUTS.get(fmt)
    if cls is None:
        raise UserError(f"export.format: '{fmt}' is not available (available: {', '.join(sorted(LAYOUTS))})")
    return cls
