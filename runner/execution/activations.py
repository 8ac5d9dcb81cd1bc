"""Named lists of activation batches with a memory budget, spilling to local disk beyond it.

A worker's calibration and evaluation streams live here. Under the budget every batch stays
in memory; once a new batch would exceed it, that batch goes to a safetensors file in the
spill directory and is read back when iterated. Values are exact either way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shardquant.config import parse_size


class ActivationStore:
    """Streams of tensors (e.g. 'calib', 'eval_q') held in memory up to `budget` bytes."""

    def __init__(self, budget: str | int | None = None, spill_dir: str | None = None, *, tag: str = "w"):
        self.budget = parse_size(budget) if budget is not None else None
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self.tag = "".join(c if c.isalnum() else "_" for c in tag)
        self._streams: dict[str, list[torch.Tensor | Path]] = {}
        self._sizes: dict[str, list[int]] = {}
        self._devices: dict[str, torch.device] = {}
        self.in_memory = 0
        self.spilled = 0
        self._serial = 0

    # --- bookkeeping ----------------------------------------------------------------------

    def _spill_path(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"shardquant-spill-{self.tag}-", dir=self._spill_root))
        self._serial += 1
        return self._dir / f"{self._serial:08d}.safetensors"

    def _hold(self, t: torch.Tensor) -> torch.Tensor | Path:
        n = t.numel() * t.element_size()
        if self.budget is None or self.in_memory + n <= self.budget:
            self.in_memory += n
            return t
        path = self._spill_path()
        save_file({"t": t.detach().contiguous().cpu()}, str(path))
        self.spilled += n
        return path

    def _drop(self, item: torch.Tensor | Path, n: int) -> None:
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
            self.spilled -= n
        else:
            self.in_memory -= n

    def _get(self, name: str, item: torch.Tensor | Path) -> torch.Tensor:
        if isinstance(item, Path):
            return load_file(str(item), device=str(self._devices[name]))["t"]
        return item

    # --- the interface ----------------------------------------------------------------------

    def put(self, name: str, batches: list[torch.Tensor]) -> None:
        """Replace stream `name` with `batches`."""
        self.delete(name)
        self._devices[name] = batches[0].device if batches else torch.device("cpu")
        self._streams[name] = []
        self._sizes[name] = []
        for t in batches:
            self._sizes[name].append(t.numel() * t.element_size())
            self._streams[name].append(self._hold(t))

    def has(self, name: str) -> bool:
        return name in self._streams

    def streams(self) -> list[str]:
        return sorted(self._streams)

    def iter(self, name: str) -> Iterator[torch.Tensor]:
        """The batches of a stream, in order (spilled ones read back one at a time)."""
        for item in self._streams.get(name, []):
            yield self._get(name, item)

    def map(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every batch of a stream by fn(batch), one batch in flight at a time."""
        items, sizes = self._streams[name], self._sizes[name]
        for i, item in enumerate(items):
            new = fn(self._get(name, item))
            self._drop(item, sizes[i])
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

    def clear(self) -> None:
        for name in list(self._streams):
            self.delete(name)
        if self._dir is not None:
            for p in self._dir.glob("*"):
                p.unlink(missing_ok=True)
            os.rmdir(self._dir)
            self._dir = None
