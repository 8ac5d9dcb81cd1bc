"""Read-side of a safetensors checkpoint: which file holds which tensor, checked up front.

Only headers are read here (a few KB per file); tensors are loaded one block at a time by
`ModelSource`. Every header is validated against the file size, so a truncated or corrupt
shard is reported by name before calibration starts, not an hour later.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from shardquant.errors import UserError

_MAX_HEADER = 100 * 2**20
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | Path, *, key: str = "model.path") -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raise UserError naming the file when it is bad.

    Checks: 8-byte length prefix, JSON object, known dtypes, offsets that match the shapes,
    lie within the file and tile the data region exactly (as the safetensors library demands,
    so a file accepted here is one it loads).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{key}: '{p.name}' is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or n + 8 > size:
                raise UserError(f"{key}: '{p.name}' is truncated or not safetensors (bad header length)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{key}: cannot read '{p}': {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, a 5000-digit number, [[[[...
        raise UserError(f"{key}: '{p.name}' has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{key}: '{p.name}' has a corrupt safetensors header")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise UserError(f"{key}: '{p.name}' has a corrupt safetensors header (__metadata__)")
            continue
        info = _parse_entry(entry)
        if info is None:
            raise UserError(f"{key}: '{p.name}' has a corrupt entry for tensor '{name}'")
        if info.end > data_len:
            raise UserError(
                f"{key}: '{p.name}' is truncated: tensor '{name}' ends at byte {info.end + 8 + n} "
                f"but the file has {size} bytes"
            )
        out[name] = info
    end = 0
    for name, info in sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != end:
            raise UserError(f"{key}: '{p.name}' is corrupt: tensor '{name}' overlaps another or leaves a gap")
        end = info.end
    if end != data_len:
        raise UserError(f"{key}: '{p.name}' is corrupt: {data_len - end} bytes after its last tensor")
    return out


def _parse_entry(entry: object) -> TensorInfo | None:
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if start < 0 or end < start or end - start != numel * _DTYPE_BYTES[dtype]:
        return None
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _plain_file_name(name: str) -> bool:
    """A bare file name inside the directory: no separator, no '..', not absolute, no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00")


class CheckpointIndex:
    """Tensor name -> file for a model directory with one or many safetensors files."""

    def __init__(self, root: str | Path, *, key: str = "model.path"):
        self.root = Path(root)
        self.key = key
        self.files: dict[str, Path] = {}
        self.infos: dict[str, TensorInfo] = {}
        index_path = self.root / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                raise UserError(f"{key}: '{index_path}' is not a valid safetensors index") from None
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in self.root.glob("*.safetensors"))
            weight_map = None
        if not shard_names:
            if any(self.root.glob("*.bin")) or any(self.root.glob("*.pt")):
                raise UserError(
                    f"{key}: '{self.root}' holds only pickle weights (*.bin/*.pt); shardquant reads "
                    "safetensors only (convert with transformers' save_pretrained)"
                )
            raise UserError(f"{key}: '{self.root}' has config.json but no *.safetensors weights")
        for shard in shard_names:
            if not _plain_file_name(shard):
                raise UserError(f"{key}: the index names '{shard}', which is not a file name inside the model dir")
            path = self.root / shard
            if not path.is_file():
                raise UserError(f"{key}: shard '{shard}' named in the index is missing")
            for name, info in read_header(path, key=key).items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                self.files[name] = path
                self.infos[name] = info
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self.files]
            if missing:
                raise UserError(f"{key}: tensor '{missing[0]}' is in the index but not in its shard")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with prefix, in sorted order."""
        return sorted(n for n in self.files if n.startswith(prefix))
