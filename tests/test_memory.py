"""Freed heap memory goes back to the OS between blocks (glibc malloc_trim)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os
import torch
from shardquant.execution.memory import trim_heap

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

big = torch.ones(4 * 2**20)  # 16 MiB through mmap; freeing it raises glibc's mmap threshold
del big
keep, tensors = [], []
for i in range(300):  # ~1 MiB each, now from the heap; every tenth kept so the heap can't shrink by itself
    t = torch.ones(2**18)
    (keep if i % 10 == 9 else tensors).append(t)
before = rss()
tensors.clear()
freed = rss()
assert trim_heap()
after = rss()
print(before, freed, after)
"""


def test_trim_returns_freed_heap_to_the_os():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    before, freed, after = (int(x) for x in out.split())
    mib = 2**20
    assert freed > before - 50 * mib, "the freed tensors were expected to stay resident without a trim"
    assert after < freed - 150 * mib, (before / mib, freed / mib, after / mib)


def test_own_peak_is_not_the_parents():
    """A process started by a big parent reports its own peak (Linux keeps ru_maxrss across
    exec, which would report the parent's size: the driver's 1.1x-model-size reading)."""
    parent = r"""
import resource, subprocess, sys
big = bytearray(1500 * 2**20)
big[:: 4096] = b"x" * len(big[:: 4096])  # touch every page: 1.5 GB resident in the parent
child = "from shardquant.record.report import own_peak_rss_bytes; import resource; " \
        "print(own_peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    own, maxrss = (int(x) for x in out.split())
    assert maxrss > 1400 * 2**20  # the kernel's counter still holds the parent's 1.5 GB
    assert own < 1000 * 2**20, own
