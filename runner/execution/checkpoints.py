"""A worker's resumable files, written in the background: its activation checkpoint (every
stream of its share, exactly, in one file) and the finished blocks' state files.

The block loop records a block as done once its state file and every worker's activations
after it are on disk. Both writes run in background threads while the next block calibrates
and are waited for at the end of that block, so they cost no wall time unless the disk is
slower than a block.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, wait
from pathlib import Path

import torch
from safetensors import safe_open

from shardquant.execution.activations import ActivationStore
from shardquant.export.shards import TensorSpec, write_shard
from shardquant.record.background import WriterThread
from shardquant.record.state import save_tensors


class ActivationCheckpointer:
    """Writes (in the background) and reads the checkpoints of one `ActivationStore`."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self._thread = WriterThread("shardquant-save")
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
        self._pending = self._thread.submit(save_tensors, Path(path), tensors)

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
        self._thread.close()
        self._pending = None


class BlockFileWriter:
    """Writes finished blocks' state files (`save_tensors`) in a background thread.

    `submit` first waits for the write before it, so at most one finished block waits in host
    memory beside the one being built; `result` waits for a file and gives its sha256."""

    def __init__(self) -> None:
        self._thread = WriterThread("shardquant-block")
        self._writes: dict[str, Future[str]] = {}

    def submit(self, path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
        """Start writing `tensors` (moved to host memory now) to `path`, atomically."""
        wait(list(self._writes.values()))  # an error stays in its future, for `result`
        host = {k: v.detach().to("cpu") for k, v in tensors.items()}
        self._writes[str(path)] = self._thread.submit(save_tensors, Path(path), host)

    def result(self, path: str | Path) -> str:
        """Wait for the write of `path` (re-raising its error); the file's sha256."""
        return self._writes.pop(str(path)).result()

    def close(self) -> None:
        """Wait for the writes still running and stop the thread; their results are dropped."""
        self._thread.close()
        self._writes = {}
