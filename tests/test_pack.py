"""Packing unsigned codes into int32 words: round trips, the word layout, the library's layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardquant.algorithms.pack import PACK_BITS, pack, packed_len, unpack


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
