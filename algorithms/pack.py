"""Packing unsigned integer codes into int32 words, and back.

Little end first: along the packed dim, code ``j`` of word ``w`` is element
``w * (32 // bits) + j`` and sits at bits ``[j * bits, (j + 1) * bits)`` of the word. For 4
bits, the codes 1, 2, ..., 8 pack into the single word 0x87654321. A length that is not a
multiple of ``32 // bits`` is padded with zero codes, so ``n`` codes take
``ceil(n * bits / 32)`` words; ``unpack`` needs ``n`` to drop the padding.

This is the word layout of GPTQ checkpoints (``qweight`` packed along the input dim,
``qzeros`` along the output dim) and, for 2, 4 and 8 bits, of compressed-tensors'
pack-quantized tensors (which store ``code + 2**(bits-1)`` of a signed code, i.e. exactly our
unsigned codes). Words are int32 holding the raw 32 bits, so a word whose top bit is set is
negative.

>>> pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)
tensor([[-2023406815]], dtype=torch.int32)
>>> hex(-2023406815 & 0xFFFFFFFF)
'0x87654321'

AWQ's GEMM layout (AutoAWQ, vLLM ``awq``) packs 4-bit codes along the output dim with an
interleave inside each word: nibble ``i`` of a word holds element ``AWQ_ORDER[i]`` of its
eight (``pack_awq``), so the codes 1, 2, ..., 8 pack into 0x86427531.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shardquant.algorithms.counts import AWQ_BITS, PACK_BITS, words

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _check_bits(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS} (32 % bits == 0), got {bits}")
    return 32 // bits


def packed_len(n: int, bits: int) -> int:
    """Words that hold ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return words(n, bits)


def pack(codes: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Pack unsigned ``codes`` (any integer dtype, values in [0, 2**bits)) along ``dim``.

    Returns int32 with ``dim`` shrunk to ``packed_len(codes.shape[dim], bits)``; the other
    dims are unchanged.
    """
    per = _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dim")
    x = codes.movedim(dim, -1).to(torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(x.min())}, {int(x.max())}]"
        )
    n = x.shape[-1]
    words = packed_len(n, bits)
    x = torch.nn.functional.pad(x, (0, words * per - n)).reshape(*x.shape[:-1], words, per)
    out = torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    for j in range(per):
        out |= x[..., j] << (j * bits)
    # The low 32 bits as a signed int32 (two's complement).
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).movedim(-1, dim).contiguous()


def unpack(words: Tensor, bits: int, length: int, dim: int = -1) -> Tensor:
    """Inverse of ``pack``: int32 codes with ``dim`` restored to ``length``."""
    per = _check_bits(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"words must be int32, got {words.dtype}")
    if words.dim() == 0:
        raise ValueError("words must have at least one dim")
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if not 0 <= length <= w.shape[-1] * per or packed_len(length, bits) != w.shape[-1]:
        raise ValueError(f"{w.shape[-1]} words of {bits}-bit codes cannot hold exactly {length} codes")
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    codes = codes.reshape(*w.shape[:-1], -1)[..., :length]
    return codes.to(torch.int32).movedim(-1, dim).contiguous()


def _awq_perm(device: torch.device, inverse: bool = False) -> Tensor:
    order = torch.tensor(AWQ_ORDER, device=device)
    return torch.argsort(order) if inverse else order


def pack_awq(codes: Tensor, dim: int = -1) -> Tensor:
    """Pack unsigned 4-bit ``codes`` along ``dim`` in AWQ's interleaved order: nibble ``i`` of
    word ``w`` holds element ``w * 8 + AWQ_ORDER[i]``. ``codes.shape[dim]`` must be a multiple
    of 8 (the format has no padding)."""
    x = codes.movedim(dim, -1)
    n = x.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packs 8 codes per word: length {n} is not a multiple of 8")
    x = x.reshape(*x.shape[:-1], n // 8, 8)[..., _awq_perm(x.device)].reshape(*x.shape[:-1], n)
    return pack(x, AWQ_BITS).movedim(-1, dim).contiguous()


def unpack_awq(words: Tensor, dim: int = -1) -> Tensor:
    """Inverse of ``pack_awq``: int32 codes, ``dim`` eight times longer."""
    w = words.movedim(dim, -1)
    n = w.shape[-1] * 8
    x = unpack(w.contiguous(), AWQ_BITS, n)
    x = x.reshape(*x.shape[:-1], n // 8, 8)[..., _awq_perm(x.device, inverse=True)].reshape(*x.shape[:-1], n)
    return x.movedim(-1, dim).contiguous()
