"""Giving freed memory back to the operating system between blocks.

glibc's malloc raises its mmap threshold each time a large block is freed, so after a few
blocks most tensors come from the heap, and the freed heap is kept, fragmented, by the
process: peak RSS then creeps up block after block although nothing is alive. Trimming the
heap once per block keeps a long run at the size of one block's work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Return the heap's free memory to the OS (glibc); False where there is no malloc_trim."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
