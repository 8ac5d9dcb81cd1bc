"""A worker's activation checkpoint: every stream of its share, exactly, in one file.

The block loop records a block as done once every worker's activations after it are on
disk. The write runs in a background thread while the next block calibrates (`begin`), and
is waited for at the end of that block (`end`), so a checkpoint costs no wall time unless
the disk is slower than a block.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from shardquant.execution.activations import ActivationStore
from shardquant.record.state import load_tensors, save_tensors


class ActivationCheckpointer:
    """Writes (in the background) and reads the checkpoints of one `ActivationStore`."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[str] | None = None

    def begin(self, path: str | Path) -> None:
        """Start writing the store's streams to `path` (atomic) after waiting for any write
        still pending; `end` waits for it. The batches are never changed in place (a stream's
        batches are replaced), so the ones being written stay valid. A store that spills is
        written now: its batches, read back for the write, would otherwise stay in memory,
        over its budget, while the next block runs."""
        self.end()
        tensors = {}
        for stream in self.store.streams():
            for i, h in enumerate(self.store.iter(stream)):
                tensors[f"{stream}.{i:06d}"] = h
        if self.store.spilled:
            done: Future[str] = Future()
            try:
                done.set_result(save_tensors(Path(path), tensors))
            except BaseException as e:
                done.set_exception(e)
            self._pending = done
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-save")
        self._pending = self._pool.submit(save_tensors, Path(path), tensors)

    def end(self) -> str | None:
        """Wait for the write `begin` started (re-raising its error); the file's sha256, or
        None when none was pending."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        """Replace the store's streams with those of checkpoint `path`, onto `device`."""
        tensors = load_tensors(Path(path), device=device)
        streams: dict[str, list[tuple[int, Tensor]]] = {}
        for key, t in tensors.items():
            stream, i = key.rsplit(".", 1)
            streams.setdefault(stream, []).append((int(i), t))
        self.store.clear()
        for stream, items in streams.items():
            self.store.put(stream, [t for _, t in sorted(items, key=lambda x: x[0])])

    def close(self) -> None:
        """Wait for the background thread to finish and stop it; a pending result is dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = None
