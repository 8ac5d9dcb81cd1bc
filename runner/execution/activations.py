"""Named lists of activation batches with a memory budget, spilling to local disk beyond it.

A worker's calibration and evaluation streams live here. Under the budget every batch stays
in memory; once a new batch would exceed it, that batch goes to a file in the spill
directory through the `cluster.spill` backend (`execution.spill`: plain files or DeepSpeed's
async I/O) and is read back when iterated, one batch ahead: the next spilled batch is read
while the current one computes, and a replaced batch is written while the next one computes.
Values are exact either way. With `cluster.spill: none` a batch over the budget is an error.

Besides the budget, a spilling pass holds at most two spilled batches in flight (the one read
ahead and the one being written), like the forward's own batch and its output.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from shardquant.config import parse_size
from shardquant.errors import UserError
from shardquant.execution import spill as spilling
from shardquant.execution.spill import SpillBackend, Spilled, SpillStats

Item = torch.Tensor | Spilled


class ActivationStore:
    """Streams of tensors (e.g. 'calib', 'eval_q') held in memory up to `budget` bytes."""

    def __init__(self, budget: str | int | None = None, spill_dir: str | None = None, *, tag: str = "w",
                 spill: str = "disk"):
        self.budget = parse_size(budget) if budget is not None else None
        self._spill_root = spill_dir
        self.requested = spill
        self.mode = spilling.resolve(spill, spill_dir)  # none, disk or aio
        self._dir: Path | None = None
        self._backend: SpillBackend | None = None
        self._done = SpillStats()  # what closed backends moved (clear() closes one)
        self.tag = "".join(c if c.isalnum() else "_" for c in tag)
        self._streams: dict[str, list[Item]] = {}
        self._sizes: dict[str, list[int]] = {}
        self._devices: dict[str, torch.device] = {}
        self.in_memory = 0
        self.spilled = 0
        self._serial = 0
        self._reported = SpillStats()

    # --- bookkeeping ----------------------------------------------------------------------

    def _spiller(self) -> SpillBackend:
        if self._backend is None:
            try:
                self._backend = spilling.BACKENDS[self.mode]()
            except Exception as e:  # noqa: BLE001 - auto falls back to plain files; aio names the failure
                if self.requested != "auto" or self.mode != "aio":
                    if isinstance(e, UserError):
                        raise
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise UserError(f"cluster.spill aio: DeepSpeed's async I/O op cannot be loaded: {first}") from e
                print(f"shardquant: cluster.spill auto: DeepSpeed's async I/O failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); spilling to plain files", file=sys.stderr)
                self.mode = "disk"
                self._backend = spilling.BACKENDS["disk"]()
        return self._backend

    def _spill_path(self) -> Path:
        if self._dir is None:
            self._dir = spilling.spill_dir_for(spilling.spill_root(self._spill_root), self.tag)
        self._serial += 1
        return self._dir / f"{self._serial:08d}.bin"

    def _hold(self, t: torch.Tensor) -> Item:
        n = t.numel() * t.element_size()
        if self.budget is None or self.in_memory + n <= self.budget:
            self.in_memory += n
            return t
        if self.mode == "none":
            raise UserError(
                f"cluster.spill none: the activations exceed cluster.activation_memory ({self.budget} B on worker "
                f"{self.tag}); raise it, or let them spill (cluster.spill: auto)"
            )
        item = self._spiller().write(t, self._spill_path())
        self.spilled += n
        return item

    def _drop(self, item: Item, n: int) -> None:
        if isinstance(item, Spilled):
            self._spiller().remove(item)
            self.spilled -= n
        else:
            self.in_memory -= n

    def _ahead(self, name: str, items: list[Item]) -> Iterator[torch.Tensor]:
        """`items` in order, each spilled one read while the batch before it is in use."""
        device = self._devices.get(name, torch.device("cpu"))
        reads: dict[int, Future[torch.Tensor]] = {}

        def start(j: int) -> None:
            if j < len(items) and isinstance(items[j], Spilled) and j not in reads:
                reads[j] = self._spiller().read(items[j], device)

        start(0)
        for i, item in enumerate(items):
            start(i + 1)
            if isinstance(item, Spilled):
                w = time.perf_counter()
                t = reads.pop(i).result()
                self._spiller().stats.add(wait_s=time.perf_counter() - w)
                yield t
                del t
            else:
                yield item

    # --- the interface ----------------------------------------------------------------------

    def put(self, name: str, batches: Iterable[torch.Tensor]) -> None:
        """Replace stream `name` with `batches` (held, or spilled, one at a time as they come)."""
        self.delete(name)
        self._devices[name] = torch.device("cpu")
        self._streams[name] = []
        self._sizes[name] = []
        for k, t in enumerate(batches):
            if k == 0:
                self._devices[name] = t.device
            self._sizes[name].append(t.numel() * t.element_size())
            self._streams[name].append(self._hold(t))

    def has(self, name: str) -> bool:
        return name in self._streams

    def streams(self) -> list[str]:
        return sorted(self._streams)

    def iter(self, name: str) -> Iterator[torch.Tensor]:
        """The batches of a stream, in order (spilled ones read back one batch ahead)."""
        return self._ahead(name, list(self._streams.get(name, [])))

    def meta(self, name: str) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """Each batch's dtype and shape, without reading a spilled one."""
        return [(it.dtype, tuple(it.shape)) for it in self._streams.get(name, [])]

    def map(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every batch of a stream by fn(batch); a spilled batch is read while the one
        before it computes, and a new one spilled is written while the next one computes."""
        items, sizes = self._streams[name], self._sizes[name]
        for i, h in enumerate(self._ahead(name, list(items))):
            new = fn(h)
            del h
            self._drop(items[i], sizes[i])
            sizes[i] = new.numel() * new.element_size()
            items[i] = self._hold(new)

    def rename(self, old: str, new: str) -> None:
        self.delete(new)
        self._streams[new] = self._streams.pop(old)
        self._sizes[new] = self._sizes.pop(old)
        self._devices[new] = self._devices.pop(old)

    def delete(self, name: str) -> None:
        for item, n in zip(self._streams.pop(name, []), self._sizes.pop(name, []), strict=True):
            self._drop(item, n)
        self._devices.pop(name, None)

    def count(self, name: str) -> int:
        """Number of batches in a stream (0 when absent)."""
        return len(self._streams.get(name, []))

    def nbytes(self, name: str) -> int:
        return sum(self._sizes.get(name, []))

    def flush(self) -> None:
        """Wait until every spilled batch is in its file (re-raising a failed write)."""
        if self._backend is not None:
            self._backend.flush()

    def stats(self) -> dict[str, Any]:
        """The spill backend and what it moved since the last call: bytes written and read, the
        seconds its I/O threads spent on them, and the seconds the compute waited on it. Waits
        for the pending write first, so its bytes count in this call, not the next (or none)."""
        self.flush()
        now = self._totals()
        delta = {k: v - getattr(self._reported, k) for k, v in now.as_dict().items()}
        self._reported = now
        return {"mode": self.mode, **delta}

    def _totals(self) -> SpillStats:
        total = SpillStats(**self._done.as_dict())
        if self._backend is not None:
            total.add(**self._backend.stats.as_dict())
        return total

    def clear(self) -> None:
        """Drop every stream, remove the spill files and stop the backend's threads."""
        for name in list(self._streams):
            self.delete(name)
        if self._backend is not None:
            self._backend.close()
            self._done.add(**self._backend.stats.as_dict())
            self._backend = None
        if self._dir is not None:
            for p in self._dir.glob("*"):
                p.unlink(missing_ok=True)
            os.rmdir(self._dir)
            self._dir = None
