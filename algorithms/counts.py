"""Counts of the packed layouts, torch-free (`shardquant plan` sizes checkpoints without torch).

``n_groups`` is the one group-count formula (a trailing partial group counts as one; per
channel, ``group_size == -1``, is one group); ``words`` the int32 words that hold ``n`` codes
at ``32 // bits`` codes per word (``pack.packed_len`` is it with the bits checked).
"""

from __future__ import annotations

PACK_BITS = (2, 4, 8)  # bit widths whose codes fill an int32 word exactly
AWQ_BITS = 4


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per output row of a linear with ``in_features`` inputs."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def words(n: int, bits: int) -> int:
    """int32 words holding ``n`` codes of ``bits`` bits (the last word zero-padded)."""
    return -(-n // (32 // bits))
