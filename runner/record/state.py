"""Resumable run state in `output/state/`: per-block tensors, activations, progress.

After every block the executor writes that block's exported tensors
(`state/blocks/block-00012.safetensors`) and each worker's activations
(`state/acts/acts-00012-w0.safetensors`, only the latest kept), in the background while the
next block calibrates; once both are on disk `progress.json`
records the block as done, with the sha256 of every file it relies on. Each file is written
under a temporary name, fsynced and renamed, and progress is written last, so a run killed
at any instant leaves either the previous or the next consistent state. A rerun of the same
config continues after the last recorded block and, because activations are saved exactly,
produces the same bytes as an uninterrupted run. The final checkpoint is assembled from the
block files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shardquant.errors import UserError
from shardquant.export.manifest import sha256_file
from shardquant.export.shards import write_json_atomic

STATE_VERSION = 1
# Keys that do not change what a run computes: they may differ between a run and its resume
# (cluster.row_split: row slices give one solve's codes, so a resume may split to fit memory).
VOLATILE = ("output", "resume", "tracking", "cluster.address", "cluster.activation_memory", "cluster.spill_dir", "cluster.spill",
            "cluster.cpus_per_worker", "cluster.gpus_per_worker", "cluster.placement", "cluster.max_failures",
            "cluster.row_split")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write tensors as safetensors, streamed (temp name, fsync, rename; a failed write names
    the file and leaves nothing behind); return the sha256."""
    from shardquant.export.shards import TensorSpec, write_shard

    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    return write_shard(path, specs, (tensors[n] for n in names))


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors state file (never a pickle)."""
    return load_file(str(path), device=str(device))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config keys that determine a run's result."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in VOLATILE)}


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """A short 'key: old -> new' list of what changed between two fingerprints."""
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


class RunState:
    """The state directory of one run directory."""

    def __init__(self, output: Path):
        self.dir = Path(output) / "state"
        self.progress_path = self.dir / "progress.json"

    # --- files ----------------------------------------------------------------------------

    def block_file(self, index: int) -> Path:
        return self.dir / "blocks" / f"block-{index:05d}.safetensors"

    def qblock_file(self, index: int) -> Path:
        """Pipeline stages: block `index` dequantized in the compute dtype, for evaluation."""
        return self.dir / "qblocks" / f"block-{index:05d}.safetensors"

    def acts_file(self, done: int, worker: int) -> Path:
        return self.dir / "acts" / f"acts-{done:05d}-w{worker}.safetensors"

    # --- progress -------------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        """The recorded progress, or None when there is none."""
        if not self.progress_path.is_file():
            return None
        try:
            data = json.loads(self.progress_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(
                f"resume: '{self.progress_path}' is unreadable; delete '{self.dir}' to start over"
            ) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise UserError(f"resume: '{self.progress_path}' is not a state file of this version; delete '{self.dir}'")
        return data

    def write(self, progress: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.progress_path, progress)

    def start(self, config: dict[str, Any], *, resume: bool, workers: int) -> dict[str, Any]:
        """Progress to continue from: a new one, or the interrupted run's (checked)."""
        fp = fingerprint(config)
        old = self.read()
        if old is not None and not old.get("complete"):
            if old["config"] != fp:
                raise UserError(
                    f"output: '{self.dir.parent}' holds an unfinished run with another config ({config_diff(old['config'], fp)}); "
                    "rerun with the same config to resume it, or pick another output (or delete its state/ to start over)"
                )
            if old.get("workers") != workers:
                raise UserError(
                    f"resume: the interrupted run used {old.get('workers')} worker(s), this one asks for {workers}; "
                    f"set cluster.workers={old.get('workers')} to resume"
                )
            self.verify(old)
            return old
        if resume:
            raise UserError(f"resume: '{self.dir.parent}' has no unfinished run to resume")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return {"version": STATE_VERSION, "config": fp, "workers": workers, "done": 0, "blocks": [],
                "files": {}, "activations": [], "faults": []}

    def verify(self, progress: dict[str, Any]) -> None:
        """Check the sha256 of every file the progress relies on."""
        for rel, digest in list(progress["files"].items()) + [(a["file"], a["sha256"]) for a in progress["activations"]]:
            path = self.dir / rel
            if not path.is_file():
                raise UserError(f"resume: state file '{path}' is missing; delete '{self.dir}' to start over")
            if sha256_file(path) != digest:
                raise UserError(f"resume: state file '{path}' is corrupt (checksum differs); delete '{self.dir}' to start over")

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.dir))

    def prune_activations(self, keep: list[str]) -> None:
        """Delete activation files other than `keep` (relative names)."""
        acts = self.dir / "acts"
        if not acts.is_dir():
            return
        for p in acts.iterdir():
            if self.rel(p) not in keep:
                p.unlink(missing_ok=True)

    def finish(self, progress: dict[str, Any]) -> None:
        """Mark the run complete; its block files and activations are no longer needed."""
        progress["complete"] = True
        progress["activations"] = []
        progress["files"] = {}
        self.write(progress)
        for sub in ("acts", "blocks", "qblocks"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)


def assemble_shard(path: str, specs: list, files: list[str | None], other: Callable[[str], Any]) -> str:
    """Write final shard `path` from state files: `files[k]` holds `specs[k]` (TensorSpec),
    or is None for a tensor outside the blocks, which `other(name)` gives; return the shard's
    sha256 (for the manifest). Tensors are read one at a time; consecutive ones from the same
    file share one handle."""
    from safetensors import safe_open

    from shardquant.export.shards import write_shard

    def tensors():
        current, handle = None, None
        for spec, file in zip(specs, files, strict=True):
            if file is None:
                yield other(spec.name)
                continue
            if file != current:
                handle = safe_open(file, framework="pt", device="cpu")
                current = file
            yield handle.get_tensor(spec.name)

    return write_shard(Path(path), specs, tensors(), hash_aside=True)
