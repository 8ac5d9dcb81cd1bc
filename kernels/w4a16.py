"""``y = x @ dequant(W).T`` straight from compressed-tensors' pack-quantized tensors.

The layout (runner/export/compressed.py writes it): ``weight_packed`` int32 [N, ceil(K * bits
/ 32)] holds the unsigned codes ``signed + 2**(bits-1)`` of each row, ``32 // bits`` a word
along K, little end first; ``weight_scale`` [N, groups]; ``weight_zero_point`` (asymmetric
only) int32 [ceil(N * bits / 32), groups] the unsigned zeros packed the same way along N
(symmetric: the zero is ``2**(bits-1)``); ``weight_g_idx`` (optional) int32 [K] the group of
each input column, else column ``k`` is in group ``k // group_size``. A weight is
``(code - zero) * scale``, rounded to the activations' dtype, as a dequantized copy would be.

The kernel unpacks and dequantizes a [BK, BN] tile of W in registers for each step of the
K loop of its [BM, BN] output tile: no dequantized copy of the weight is ever written.
``dequantize_packed`` + ``torch.nn.functional.linear`` is the reference (``packed_linear``
runs it where the kernel does not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import select
from ._round import tile

BM, BN, BK = 16, 64, 64  # tiles on a GPU (decode shapes: M is small)


@triton.jit
def _w4a16_kernel(
    X, Wp, S, Z, GI, B, Y, M, N, K, KW, G, glen,
    BITS: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, HAS_B: tl.constexpr, IEEE: tl.constexpr,
    TM: tl.constexpr, TN: tl.constexpr, TK: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = tl.program_id(0) * TM + tl.arange(0, TM)
    rn = tl.program_id(1) * TN + tl.arange(0, TN)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([TM, TN], tl.float32)
    for k0 in range(0, K, TK):
        rk = k0 + tl.arange(0, TK)
        kmask = rk < K
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(Wp + rn[None, :] * KW + (rk // PER)[:, None], mask=wmask, other=0)
        codes = (words >> ((rk % PER) * BITS)[:, None]) & MASK
        if HAS_G:
            g = tl.load(GI + rk, mask=kmask, other=0)
        else:
            g = rk // glen
        s = tl.load(S + rn[None, :] * G + g[:, None], mask=wmask, other=0.0).to(tl.float32)
        if HAS_Z:
            zw = tl.load(Z + (rn // PER)[None, :] * G + g[:, None], mask=wmask, other=0)
            z = (zw >> ((rn % PER) * BITS)[None, :]) & MASK
        else:
            z = 1 << (BITS - 1)
        w = ((codes - z).to(tl.float32) * s).to(x.dtype)  # [TK, TN], the tile of W^T
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_B:
        acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _groups(in_features: int, group_size: int, g_idx: Tensor | None, device: torch.device) -> Tensor:
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    glen = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // glen


def dequantize_packed(
    packed: Tensor, scale: Tensor, zero_point: Tensor | None, shape: tuple[int, int], *, bits: int = 4,
    group_size: int = 128, g_idx: Tensor | None = None,
) -> Tensor:
    """Float32 [N, K] weight of pack-quantized tensors (the plain-torch reference)."""
    from shardquant.algorithms.pack import unpack

    n, k = shape
    codes = unpack(packed, bits, k)
    g = _groups(k, group_size, g_idx, packed.device)
    if zero_point is None:
        zero = torch.full((), 2 ** (bits - 1), dtype=torch.int32, device=packed.device)
    else:
        zero = unpack(zero_point, bits, n, dim=0)[:, g]
    return (codes - zero).float() * scale.float()[:, g]


def packed_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor | None, shape: tuple[int, int], *,
    bits: int = 4, group_size: int = 128, g_idx: Tensor | None = None, bias: Tensor | None = None,
) -> Tensor:
    """``x @ W.T (+ bias)`` for the pack-quantized ``W`` [N, K] (``shape``), in ``x``'s dtype:
    the kernel where the kernel mode runs it, else the dequantized weight in ``x``'s dtype."""
    n, k = shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    supported = bits in (2, 4, 8) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if not select.use_triton("w4a16_matmul", x, supported=supported):
        w = dequantize_packed(packed, scale, zero_point, shape, bits=bits, group_size=group_size, g_idx=g_idx)
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    packed, scale = packed.contiguous(), scale.contiguous()
    groups = scale.shape[1]
    gi = None if g_idx is None else g_idx.to(device=x.device, dtype=torch.int32).contiguous()
    zp = None if zero_point is None else zero_point.contiguous()
    tm, tn, tk = tile(m, BM, 64), tile(n, BN, 256), tile(k, BK, 256)
    grid = (triton.cdiv(m, tm), triton.cdiv(n, tn))
    _w4a16_kernel[grid](
        x2, packed, scale, packed if zp is None else zp, packed if gi is None else gi,
        y if bias is None else bias.contiguous(), y, m, n, k, packed.shape[1], groups,
        k if group_size == -1 else group_size,
        BITS=bits, HAS_Z=zp is not None, HAS_G=gi is not None, HAS_B=bias is not None,
        IEEE=x.dtype == torch.float32, TM=tm, TN=tn, TK=tk,
    )
    return y.reshape(*lead, n)


class PackedLinear(torch.nn.Module):
    """A linear whose weight stays pack-quantized (``packed_linear``): no dequantized copy."""

    def __init__(
        self, packed: Tensor, scale: Tensor, zero_point: Tensor | None, shape: tuple[int, int], *,
        bits: int = 4, group_size: int = 128, g_idx: Tensor | None = None, bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.shape, self.bits, self.group_size = (int(shape[0]), int(shape[1])), bits, group_size
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.register_buffer("weight_g_idx", g_idx)
        self.register_buffer("bias", bias)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], name: str, *, bits: int, group_size: int) -> PackedLinear:
        """The linear ``name`` of a compressed-tensors pack-quantized checkpoint's tensors
        (``name.weight_packed``, ``.weight_scale``, ``.weight_shape``, and when present
        ``.weight_zero_point``, ``.weight_g_idx``, ``.bias``)."""
        shape = tuple(int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        return cls(tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"],
                   tensors.get(f"{name}.weight_zero_point"), shape, bits=bits, group_size=group_size,
                   g_idx=tensors.get(f"{name}.weight_g_idx"), bias=tensors.get(f"{name}.bias"))

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.shape,
                             bits=self.bits, group_size=self.group_size, g_idx=self.weight_g_idx, bias=self.bias)
