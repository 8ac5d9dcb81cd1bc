"""Writing a checkpoint as size-capped safetensors shards plus an index, atomically.

Tensors are added block by block and flushed to a shard when the shard would exceed its
budget, so memory holds at most one shard's worth. Files go to a staging directory under
temporary names; `finalize` names them `model-0000i-of-0000n.safetensors`, writes the index
and the caller renames the staging directory into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON under a temp name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Accumulates tensors and writes them as size-capped safetensors shards."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir = Path(directory)
        self.max = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to contiguous CPU memory); flush first if it would overflow."""
        if name in self._pending or any(name in names for _, names in self._parts):
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max:
            self.flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Write the pending tensors as one shard."""
        if not self._pending:
            return
        part = self.dir / f"part-{len(self._parts):05d}.safetensors"
        tmp = part.with_name(part.name + ".tmp")
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, part)
        self._parts.append((part, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finalize(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index; return the weight map."""
        self.flush()
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(part, self.dir / final)
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json_atomic(self.dir / "model.safetensors.index.json", index)
        return weight_map
