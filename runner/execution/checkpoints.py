"""A worker's activation checkpoint: every stream of its share, exactly, in one file.

The block loop records a block as done once every worker's activations after it are on
disk. The write runs in a background thread while the next block calibrates (`begin`), and
is waited for at the end of that block (`end`), so a checkpoint costs no wall time unless
the disk is slower than a block.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from shardquant.execution.activations import ActivationStore
from shardquant.export.shards import TensorSpec, write_shard
from shardquant.record.state import save_tensors


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
        written now, streamed: its spilled batches are read back one at a time (one ahead)
        straight into the file, so the write holds no more than the store's budget, and no
        pass of the next block deletes a spilled file it still has to read."""
        self.end()
        if self.store.spilled:
            done: Future[str] = Future()
            try:
                done.set_result(self._write_streamed(Path(path)))
            except BaseException as e:
                done.set_exception(e)
            self._pending = done
            return
        tensors = {}
        for stream in self.store.streams():
            for i, h in enumerate(self.store.iter(stream)):
                tensors[f"{stream}.{i:06d}"] = h
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-save")
        self._pending = self._pool.submit(save_tensors, Path(path), tensors)

    def _write_streamed(self, path: Path) -> str:
        """The streams as one safetensors file, in `save_tensors`' (sorted) order; its sha256."""
        streams = self.store.streams()  # sorted: 'calib.000001' < 'calib_next.000000' ('.' < '_')
        specs = [TensorSpec(f"{s}.{i:06d}", dtype, shape)
                 for s in streams for i, (dtype, shape) in enumerate(self.store.meta(s))]
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_shard(path, specs, itertools.chain.from_iterable(self.store.iter(s) for s in streams))

    def end(self) -> str | None:
        """Wait for the write `begin` started (re-raising its error); the file's sha256, or
        None when none was pending."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        """Replace the store's streams with those of checkpoint `path`, onto `device`, one tensor
        at a time (a spilling store holds no more than its budget while loading)."""
        self.store.clear()
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            streams: dict[str, list[tuple[int, str]]] = {}
            for key in f.keys():
                stream, i = key.rsplit(".", 1)
                streams.setdefault(stream, []).append((int(i), key))
            for stream, keys in streams.items():
                self.store.put(stream, (f.get_tensor(k) for _, k in sorted(keys)))

    def close(self) -> None:
        """Wait for the background thread to finish and stop it; a pending result is dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = None
