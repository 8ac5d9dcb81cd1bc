"""Writing a checkpoint as size-capped safetensors shards, streamed, plus an index.

The set of tensors a checkpoint will hold (names, dtypes, shapes) is known before the first
block is solved, so shards are planned up front: each shard's header is written first and
every tensor's bytes are appended the moment it is produced. Memory never holds more than
the tensor being written, whatever the shard size, and shard names are final from the start
(`model-0000i-of-0000n.safetensors`). Each shard is written under a temporary name and
renamed when complete; the index is written last. A file already written this way for
exactly a shard's plan (a block's state file) can become that shard without being written
again (`adopt_shard`).

safetensors has no streaming writer, hence this small one; files are read back with the
safetensors library in the tests.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.bool: "BOOL",
}


def _name_failed_write(e: OSError, path: Path) -> None:
    """Attach the file to an OSError from a write (write/flush errors carry no name), so a full
    disk is reported with the file that hit it."""
    if e.filename is None:
        e.filename = str(path)


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON under a temp name, fsync, rename; a failed write leaves no temp file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _name_failed_write(e, tmp)
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the checkpoint will hold."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut an ordered tensor list into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_names(n: int) -> list[str]:
    """The file names of a checkpoint with n shards."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _tensor_bytes(spec: TensorSpec, tensor: torch.Tensor) -> bytes | memoryview:
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(
            f"tensor '{spec.name}' is {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}"
        )
    t = tensor.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""  # no copy


def write_shard(path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor], *,
                hash_aside: bool = False) -> str:
    """Write one planned shard from tensors given in plan order, one in memory at a time
    (temp name, fsync, rename); return the file's sha256, hashed as it is written. Workers
    call this for their shards in parallel.

    `hash_aside`: hash each tensor's bytes in a second thread while they are written (and the
    last one's while the file is fsynced), so the hash costs little wall time. For a write
    that is waited for; a write already in the background would only take the second core
    from the computation it runs beside."""
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-hash") if hash_aside else None
    hashed = None
    try:
        with tmp.open("wb") as f:
            for k, data in enumerate(itertools.chain(
                [_header(specs)], (_tensor_bytes(s, t) for s, t in zip(specs, tensors, strict=True))
            )):
                if hasher is None:
                    digest.update(data)
                else:
                    hashed = hasher.submit(digest.update, data)
                f.write(data)
                if hashed is not None and k < len(specs):  # not the last: it is hashed during the fsync
                    hashed.result()
            f.flush()
            os.fsync(f.fileno())
        if hashed is not None:
            hashed.result()
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file, give its space back
        _name_failed_write(e, tmp)
        tmp.unlink(missing_ok=True)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if hasher is not None:
            hasher.shutdown(wait=True)
    return digest.hexdigest()


_NO_LINK = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)


def adopt_shard(source: Path, path: Path, specs: list[TensorSpec]) -> bool:
    """Make ``source``, a file `write_shard` wrote for exactly ``specs``, the shard ``path``
    without writing its bytes again: a hard link, or (on a filesystem without them) a copy
    under a temp name, fsynced and renamed. False, with nothing written, when ``source`` is
    missing or is not that file (its header and size differ from the plan's)."""
    header = _header(specs)
    try:
        with open(source, "rb") as f:
            if f.read(len(header)) != header or os.fstat(f.fileno()).st_size != len(header) + sum(s.nbytes for s in specs):
                return False
    except FileNotFoundError:
        return False
    try:
        os.link(source, path)
        return True
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    tmp = path.with_name(path.name + ".tmp")
    try:
        shutil.copyfile(source, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError):
            _name_failed_write(e, tmp)
        tmp.unlink(missing_ok=True)
        raise
    return True


def write_index(directory: Path, shards: list[list[TensorSpec]]) -> dict[str, str]:
    """`model.safetensors.index.json` for planned shards; returns the weight map."""
    names = shard_names(len(shards))
    weight_map = {s.name: names[k] for k, shard in enumerate(shards) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(Path(directory) / "model.safetensors.index.json", index)
    return weight_map
