"""Packing codes into int32 words: round trips, the word layouts (plain and AWQ's interleave),
the library's layout, and each export format's linear tensors read back to the quantized weight."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardquant.algorithms.pack import PACK_BITS, pack, pack_awq, packed_len, unpack, unpack_awq
from shardquant.algorithms.quantizer import QuantizedWeight, QuantSpec


@st.composite
def codes_and_dim(draw):
    bits = draw(st.sampled_from(PACK_BITS))
    shape = tuple(draw(st.lists(st.integers(1, 37), min_size=1, max_size=3)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    # Include the extremes: all-zero and all-max codes exercise the sign bit of the words.
    fill = draw(st.sampled_from(["random", "zero", "max"]))
    if fill == "random":
        codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int32)
    else:
        codes = torch.full(shape, 0 if fill == "zero" else 2**bits - 1, dtype=torch.int32)
    return codes, bits, dim


@settings(max_examples=200, deadline=None)
@given(codes_and_dim())
def test_unpack_inverts_pack(case):
    codes, bits, dim = case
    words = pack(codes, bits, dim)
    assert words.dtype == torch.int32
    expected = list(codes.shape)
    expected[dim] = packed_len(codes.shape[dim], bits)
    assert list(words.shape) == expected
    assert torch.equal(unpack(words, bits, codes.shape[dim], dim), codes)


def test_little_end_first_word_layout():
    # 4 bits: code j of a word at bits 4j.
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() & 0xFFFFFFFF == 0x87654321
    assert pack(torch.tensor([[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]]), 2).item() & 0xFFFFFFFF == 0x80000003
    assert pack(torch.tensor([[0x12, 0x34, 0x56, 0x78]]), 8).item() == 0x78563412
    # Along dim 0: words run down the rows, one per output column.
    col = torch.arange(8, dtype=torch.int32).reshape(8, 1).expand(8, 3)
    assert pack(col, 4, dim=0).shape == (1, 3)
    assert (pack(col, 4, dim=0) & 0xFFFFFFFF == 0x76543210).all()
    # A ragged tail is padded with zero codes.
    assert pack(torch.tensor([[1, 2, 3]]), 4).item() == 0x321


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_matches_compressed_tensors_pack(bits, dim):
    """compressed-tensors packs signed codes c as c + 2**(bits-1): our unsigned codes, same words."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (48, 64), generator=gen, dtype=torch.int32)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    ours = pack(codes, bits, dim)
    assert torch.equal(ours, pack_to_int32(signed, bits, packed_dim=dim))
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim), signed)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(2, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        pack(torch.tensor([[-1]]), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack(torch.zeros(2, 1, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match="cannot hold exactly 9 codes"):
        unpack(torch.zeros(2, 1, dtype=torch.int32), 4, 9)


# --- AWQ's interleaved order -----------------------------------------------------------------

AWQ_ORDER_DEF = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map: nibble i holds element [i]


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), words=st.integers(1, 6), dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_awq_unpack_inverts_pack(rows, words, dim, seed):
    codes = torch.randint(0, 16, (rows, words * 8), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    if dim == 0:
        codes = codes.t().contiguous()
    packed = pack_awq(codes, dim=dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == words and packed.shape[1 - dim] == rows
    assert torch.equal(unpack_awq(packed, dim=dim), codes)
    # Each word, read nibble by nibble, holds its eight codes in AutoAWQ's order.
    flat = (packed if dim == 1 else packed.t()).to(torch.int64) & 0xFFFFFFFF
    src = codes if dim == 1 else codes.t()
    for r in range(rows):
        for c in range(words):
            word = int(flat[r, c])
            assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(src[r, 8 * c + AWQ_ORDER_DEF[i]]) for i in range(8)]


def test_awq_word_layout_and_bad_input():
    assert pack_awq(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).item() & 0xFFFFFFFF == 0x86427531
    with pytest.raises(ValueError, match="not a multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_awq(torch.full((1, 8), 16))


# --- each format's linear tensors round-trip to the quantized weight ------------------------

FORMAT_BITS = {"compressed-tensors": (2, 4, 8), "gptq": (2, 4, 8), "awq": (4,)}


@st.composite
def quantized_weights(draw, fmt: str):
    """A random QuantizedWeight the format can hold: codes, fp16-valued scales, zero points
    (fixed mid-range when symmetric), and for gptq any group assignment (act-order)."""
    bits = draw(st.sampled_from(FORMAT_BITS[fmt]))
    sym = True if fmt == "gptq" else draw(st.booleans())
    group = draw(st.sampled_from([-1, 8, 16, 32, 64]))
    per = 32 // bits
    unit = max(8 if fmt == "awq" else per, 1)
    out_f = unit * draw(st.integers(1, 5))
    in_step = per if group == -1 else math.lcm(group, per)
    in_f = in_step * draw(st.integers(1, max(1, 192 // in_step)))
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    n_groups = spec.n_groups(in_f)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32)
    scales = (torch.rand(out_f, n_groups, generator=gen) * 0.1 + 1e-4).half().float()
    if sym:
        zeros = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(in_f, dtype=torch.int32) // spec.group_len(in_f)
    if fmt == "gptq" and draw(st.booleans()):
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]  # act-order: any column to any group
    return QuantizedWeight(codes, scales, zeros, g_idx, spec)


def exporter_for(fmt: str, spec: QuantSpec):
    """The format's exporter with only what `linear_tensors` reads (no model behind it)."""
    from types import SimpleNamespace

    from shardquant.config import QuantConfig
    from shardquant.export.registry import EXPORTERS

    quant = QuantConfig(method="rtn", bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
    return EXPORTERS[fmt](SimpleNamespace(dtype=torch.float32), quant)


def read_back(fmt: str, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Dequantize a format's tensors by its layout definition: compressed-tensors with the
    library's own unpacking; gptq and awq with the word layouts tested above."""
    out_f, in_f = shape
    bits = spec.bits
    if fmt == "compressed-tensors":
        from compressed_tensors.compressors.pack_quantized import unpack_from_int32

        assert t["weight_shape"].tolist() == [out_f, in_f]
        signed = unpack_from_int32(t["weight_packed"], bits, torch.Size(shape)).to(torch.int64)
        scale = t["weight_scale"].float()
        n_groups = scale.shape[1]
        zero = torch.zeros(out_f, n_groups, dtype=torch.int64)
        if "weight_zero_point" in t:
            # Along dim 0 via its transpose: the library's packed_dim=0 path fails at 4 bits when
            # there is a single word row (a transposed [1, n] view it cannot view as bytes).
            zp = t["weight_zero_point"].t().flatten().reshape(n_groups, -1)  # strides (n, 1)
            zero = unpack_from_int32(zp, bits, torch.Size((n_groups, out_f))).t().to(torch.int64)
        g = torch.arange(in_f) // spec.group_len(in_f)
        return (signed - zero[:, g]).float() * scale[:, g]
    if fmt == "gptq":
        codes = unpack(t["qweight"], bits, in_f, dim=0).t().to(torch.int64)  # [out, in]
        zeros = unpack(t["qzeros"], bits, out_f, dim=1).t().to(torch.int64) + 1  # [out, groups]
        g = t["g_idx"].long()
        return (codes - zeros[:, g]).float() * t["scales"].float().t()[:, g]
    codes = unpack_awq(t["qweight"], dim=1).t().to(torch.int64)
    zeros = unpack_awq(t["qzeros"], dim=1).t().to(torch.int64)
    g = torch.arange(in_f) // spec.group_size
    return (codes - zeros[:, g]).float() * t["scales"].float().t()[:, g]


@pytest.mark.parametrize("fmt", sorted(FORMAT_BITS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_format_tensors_round_trip(fmt, data):
    if fmt == "awq":
        weight = data.draw(quantized_weights(fmt).filter(lambda w: w.spec.group_size != -1))
    else:
        weight = data.draw(quantized_weights(fmt))
    spec = weight.spec
    exp = exporter_for(fmt, spec)
    out_f, in_f = weight.codes.shape
    tensors = exp.linear_tensors("m", weight)
    # The tensors are exactly what the plan announced.
    planned = {s.name: s for s in exp.linear_specs("m", out_f, in_f)}
    assert set(planned) == set(tensors)
    for name, t in tensors.items():
        assert (t.dtype, tuple(t.shape)) == (planned[name].dtype, planned[name].shape), name
    got = read_back(fmt, {k.removeprefix("m."): v for k, v in tensors.items()}, spec, (out_f, in_f))
    assert torch.equal(got, weight.dequantize())
