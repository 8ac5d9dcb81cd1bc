"""Float weight quantizers: FP8 E4M3 (per channel or in blocks), NVFP4 and MXFP4.

Elements are rounded to a float grid after dividing by a scale:

- ``fp8``: E4M3 (max 448, subnormals from 2**-9), one scale per output row (``group_size=-1``),
  per ``block_rows`` x ``group_size`` block, or for the whole tensor (``per_tensor``);
  scale = absmax / 448 in the stored scale dtype.
- ``nvfp4``: E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6) in groups of 16 columns; each group's scale is
  ``global * absmax / 6`` rounded to FP8 E4M3, and the effective scale is ``scale / global``
  with the per-tensor ``global = 448 * 6 / absmax(W)``.
- ``mxfp4``: E2M1 in groups of 32 with a power-of-two (E8M0) scale ``2**(e - 127)``,
  ``e = 127 + floor(log2(p)) - 2`` where ``p`` is the group's absmax rounded to a power of two.

The arithmetic (order of operations, the zero-scale replacements, ties to even on the E2M1
grid) is that of compressed-tensors 0.20's ``calculate_qparams``/``generate_gparam`` and
``fake_quantize``, so a weight solved here dequantizes to exactly what the library's readers
compute from the exported tensors (tests/test_schemes.py checks it against the library).
All math is float32 (inputs are cast), pure torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shardquant.algorithms.counts import n_groups

FloatKind = Literal["fp8", "nvfp4", "mxfp4"]
FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP8_EPS = 0.125  # compressed-tensors' replacement for a zero FP8 scale
_MX_OFFSET = 2  # floor(log2(6)): maps a group's max into E2M1's range


@dataclass(frozen=True)
class FloatSpec:
    """A float weight format. ``group_size``: columns per scale (-1: the whole row);
    ``block_rows``: output rows sharing a scale (fp8 blocks); ``scale_dtype``: the dtype fp8
    scales are stored in, which they are rounded to when computed (None: float32);
    ``per_tensor`` (fp8, ``group_size=-1``): one scale for the whole weight."""

    kind: FloatKind
    group_size: int
    block_rows: int = 1
    scale_dtype: torch.dtype | None = None
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("fp8", "nvfp4", "mxfp4"):
            raise ValueError(f"kind must be fp8, nvfp4 or mxfp4, got {self.kind!r}")
        fixed = {"nvfp4": 16, "mxfp4": 32}.get(self.kind)
        if fixed is not None and self.group_size != fixed:
            raise ValueError(f"{self.kind} has groups of {fixed} columns, got {self.group_size}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.block_rows < 1 or (self.block_rows > 1 and self.kind != "fp8"):
            raise ValueError(f"block_rows must be 1 (or > 1 for fp8 blocks), got {self.block_rows}")
        if self.per_tensor and (self.kind != "fp8" or self.group_size != -1 or self.block_rows != 1):
            raise ValueError("per_tensor is fp8 with group_size -1 and block_rows 1")

    @classmethod
    def nvfp4(cls) -> FloatSpec:
        return cls("nvfp4", 16)

    @classmethod
    def mxfp4(cls) -> FloatSpec:
        return cls("mxfp4", 32)

    @classmethod
    def fp8_channel(cls, scale_dtype: torch.dtype | None = None) -> FloatSpec:
        return cls("fp8", -1, scale_dtype=scale_dtype)

    @classmethod
    def fp8_tensor(cls, scale_dtype: torch.dtype | None = None) -> FloatSpec:
        return cls("fp8", -1, scale_dtype=scale_dtype, per_tensor=True)

    @property
    def whole_rows(self) -> bool:
        """Whether a scale spans several rows (fp8 blocks, a per-tensor scale): such weights
        are solved one linear at a time and never split by rows."""
        return self.block_rows > 1 or self.per_tensor

    @classmethod
    def fp8_block(cls, rows: int = 128, cols: int = 128, scale_dtype: torch.dtype | None = None) -> FloatSpec:
        return cls("fp8", cols, block_rows=rows, scale_dtype=scale_dtype)

    @property
    def elem_max(self) -> float:
        return FP8_MAX if self.kind == "fp8" else FP4_MAX

    @property
    def has_global(self) -> bool:
        """Whether a per-tensor global scale divides the group scales (NVFP4)."""
        return self.kind == "nvfp4"

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        return n_groups(in_features, self.group_size)


def round_e2m1(x: Tensor) -> Tensor:
    """Nearest E2M1 value of each entry of ``x`` (ties to the even code, beyond ±6 saturating),
    times the sign of ``x`` as compressed-tensors' `cast_to_fp4` does (a negative rounded to zero
    is -0.0, -0.0 itself +0.0), in the dtype of ``x``.

    The grid's spacing is 0.5 below 2, 1 below 4 and 2 up to 6. Adding ``c = spacing * 2**23``
    in float32 leaves the sum an ulp of exactly the spacing, so the add itself rounds to the
    grid, ties to even. ``c`` is ``|x|`` clamped to 1..4 with its mantissa bits cleared (the
    power of two at or below it: 1, 2 or 4), times 2**22; no integer shifts, which are slow
    on CPU. Every step but the copies runs in place (a fresh CPU tensor costs more in page
    faults than the arithmetic), and ``c``'s buffer takes the signs when ``x`` is float32."""
    a = x.to(torch.float32, copy=True).abs_().clamp_(max=E2M1_VALUES[-1])
    cf = a.clamp(1.0, 4.0)
    cf.view(torch.int32).bitwise_and_(0x7F800000)
    a.add_(cf.mul_(2.0**22)).sub_(cf)
    a.mul_(torch.sign(x, out=cf) if x.dtype == torch.float32 else torch.sign(x))
    return a.to(x.dtype)


def e4m3_to_float(values: Tensor) -> Tensor:
    """float8_e4m3fn ``values`` as float32, bit for bit torch's cast.

    On CPU torch's cast takes ~3.5 ns an element; here the byte, sign-extended to int16 and
    shifted left by 7 (the spilled sign bit 14 cleared), is the float16 of value / 256, whose
    cast to float32 is vectorized: ~0.6 ns an element. A NaN code comes out as ±480, beyond
    E4M3's ±448: then (a broken weight) torch's cast redoes it. Other devices use torch's cast."""
    if values.device.type != "cpu":
        return values.float()
    h = values.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(-16385)
    out = h.view(torch.float16).float().mul_(256.0)
    if out.numel():
        lo, hi = torch.aminmax(out)
        if float(lo) < -FP8_MAX or float(hi) > FP8_MAX:
            return values.float()
    return out


@functools.cache
def _e2m1_nibble_table() -> Tensor:
    """For each float8_e4m3fn byte, the E2M1 nibble of its value (index on the grid, bit 3 the
    sign; both zeros 0), or 16 for a value off the grid."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.tensor(E2M1_VALUES)
    hit = values.abs().unsqueeze(1) == grid
    on_grid = hit.any(1)
    table = torch.where(on_grid, hit.int().argmax(1), 16)
    return (table | ((values < 0) & on_grid).int() << 3).to(torch.uint8)


def pack_e2m1(values: Tensor) -> Tensor:
    """E2M1 ``values`` [out, in] (float8_e4m3fn holding grid values, ``in`` even) as
    compressed-tensors' packed FP4 bytes [out, in / 2]: element 2k in the low nibble, 2k+1 in
    the high; a zero of either sign is code 0, as its compressor writes a dequantized zero.
    One table lookup per element (the library's CPU packing makes eight masked passes).
    ValueError if a value is off the grid."""
    if values.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {values.shape[-1]}")
    nib = _e2m1_nibble_table().to(values.device)[values.view(torch.uint8).long()]
    if nib.numel() and int(nib.max()) > 15:
        raise ValueError("FP4 packing: a value is not on the E2M1 grid")
    return nib[..., 0::2] | nib[..., 1::2] << 4


def round_elements(x: Tensor, spec: FloatSpec) -> Tensor:
    """``x`` (already divided by its scale) clamped to the element range and rounded to the
    element grid (FP8 E4M3 by round-to-nearest-even cast, or E2M1), as float32."""
    x = x.float().clamp(-spec.elem_max, spec.elem_max)
    if spec.kind == "fp8":
        return e4m3_to_float(x.to(torch.float8_e4m3fn))
    return round_e2m1(x)


def round_pow2(x: Tensor) -> Tensor:
    """Power of two of float32 ``x`` >= 0 by its exponent bits, rounded up when the mantissa is
    at least 1.75 (E2M1's mantissa width; compressed-tensors' ``round_to_power_2``)."""
    bits = x.float().view(torch.int32)
    return ((bits + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)


def global_scale(w: Tensor) -> Tensor:
    """NVFP4's per-tensor global scale [1]: ``448 * 6 / absmax(w)`` in float32 (absmax at least
    the smallest normal float; a non-finite result becomes 1)."""
    amax = w.detach().float().abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    g = torch.nan_to_num(FP8_MAX * FP4_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return g.reshape(1)


def absmax_scales(amax: Tensor, spec: FloatSpec, gscale: Tensor | None = None) -> Tensor:
    """Group scales (float32, the values stored) from each group's absmax; ``gscale`` (NVFP4,
    broadcastable) multiplies them before they are rounded to FP8."""
    amax = amax.float()
    if spec.kind == "mxfp4":
        e = (127 + torch.floor(torch.log2(round_pow2(amax))) - _MX_OFFSET).clamp(0, 255).round()
        return torch.pow(2.0, e - 127)  # 2**-127 is a float32 subnormal: never zero
    scale = amax / spec.elem_max
    if spec.kind == "nvfp4":
        if gscale is None:
            raise ValueError("nvfp4 scales need the global scale")
        scale = gscale.float() * scale
        scale = scale.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        eps = _FP8_EPS
    elif spec.scale_dtype is not None:
        info = torch.finfo(spec.scale_dtype)
        scale = scale.clamp(info.min, info.max).to(spec.scale_dtype).float()
        eps = info.eps
    else:
        eps = torch.finfo(torch.float32).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def e8m0_exponents(scales: Tensor) -> Tensor:
    """MXFP4 scales (powers of two) as their biased E8M0 exponents, uint8."""
    return (torch.log2(scales.float()) + 127).round().to(torch.uint8)


def effective(scales: Tensor, gscale: Tensor | None) -> Tensor:
    """The divisor of the elements: the stored scale, over the global scale for NVFP4."""
    return scales if gscale is None else scales / gscale


def row_absmax(w: Tensor, spec: FloatSpec) -> Tensor:
    """Absmax of each (row, group) of ``w`` [out, in] -> [out, n_groups]; with ``block_rows`` > 1
    the max over each block of rows, repeated for its rows; ``per_tensor``: the whole weight's,
    on every row. Trailing partial groups and blocks are padded with zeros (which change no
    absmax)."""
    out_f, in_f = w.shape
    if spec.per_tensor:
        return w.float().abs().amax().expand(out_f, 1).clone()
    glen, ng = spec.group_len(in_f), spec.n_groups(in_f)
    w = w.float()
    if ng * glen != in_f:
        w = torch.nn.functional.pad(w, (0, ng * glen - in_f))
    w = w.reshape(out_f, ng, glen)
    a = torch.maximum(w.amax(-1), w.amin(-1).neg_())  # |w|'s max without an |w| copy
    if spec.block_rows > 1:
        br = spec.block_rows
        nb = -(-out_f // br)
        a = torch.nn.functional.pad(a, (0, 0, 0, nb * br - out_f)).reshape(nb, br, ng).amax(1)
        a = a.repeat_interleave(br, dim=0)[:out_f]
    return a


def by_group(t: Tensor, per_group: Tensor, spec: FloatSpec, op) -> Tensor:
    """``op(t, per_group)`` with each (row, group) value [out, n_groups] applied to its group's
    columns of ``t`` [out, in] (by broadcasting over whole groups: no column index)."""
    out_f, in_f = t.shape
    glen = spec.group_len(in_f)
    if in_f % glen == 0:
        return op(t.reshape(out_f, in_f // glen, glen), per_group.unsqueeze(-1)).reshape(out_f, in_f)
    g = torch.arange(in_f, device=t.device) // glen  # a trailing partial group
    return op(t, per_group[:, g])


@dataclass
class FloatQuantizedWeight:
    """A linear's weight in a float format: element values on the grid, scales per (row,
    group) (rows of an fp8 block repeat the block's scale) and, for NVFP4, the global scale
    per row (one value per linear, repeated)."""

    values: Tensor  # float8_e4m3fn [out, in]: E4M3 elements, or E2M1 values (exact in E4M3)
    scales: Tensor  # float32 [out, n_groups]
    global_scale: Tensor | None  # float32 [out] (NVFP4) or None
    spec: FloatSpec

    def effective_scales(self) -> Tensor:
        """[out, n_groups] divisors of the elements."""
        g = None if self.global_scale is None else self.global_scale.unsqueeze(1)
        return effective(self.scales, g)

    def dequantize(self) -> Tensor:
        """Float32 [out, in] weights the elements stand for: ``value * (scale / global)``."""
        return by_group(e4m3_to_float(self.values), self.effective_scales(), self.spec, torch.Tensor.mul_)

    def block_scales(self) -> Tensor:
        """fp8 blocks: the [ceil(out / rows), n_groups] scales, one per block."""
        return self.scales[:: self.spec.block_rows]


def float_qparams(w: Tensor, spec: FloatSpec, gscale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Scales [out, n_groups] of ``w`` [out, in] and the per-row global scale [out] (NVFP4:
    ``gscale`` [1] if given, else the tensor's own)."""
    grow = None
    if spec.has_global:
        g = global_scale(w) if gscale is None else gscale.float().reshape(1)
        grow = g.expand(w.shape[0]).clone()
    scales = absmax_scales(row_absmax(w, spec), spec, None if grow is None else grow.unsqueeze(1))
    return scales, grow


def quantize_float_rtn(weight: Tensor, spec: FloatSpec, gscale: Tensor | None = None) -> FloatQuantizedWeight:
    """Round ``weight`` [out, in] to the nearest element of its groups' scaled grids (the
    global scale of NVFP4 from ``weight`` itself unless ``gscale`` is given)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.float()
    scales, grow = float_qparams(w, spec, gscale)
    eff = effective(scales, None if grow is None else grow.unsqueeze(1))
    x = by_group(w, eff, spec, torch.div).clamp_(-spec.elem_max, spec.elem_max)
    values = (x if spec.kind == "fp8" else round_e2m1(x)).to(torch.float8_e4m3fn)  # E4M3 holds E2M1
    return FloatQuantizedWeight(values, scales, grow, spec)
