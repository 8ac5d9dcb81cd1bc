"""A checkpoint's manifest: every file's size and sha256, and the check against it.

`write_manifest` runs on the finished export directory just before it is renamed to
`output/model`; `verify` (the `shardquant verify` command) reports each file that is missing,
truncated, altered, or not in the manifest. Files are hashed in 1 MiB chunks, so neither
side ever holds a shard in memory. This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from shardquant.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "shardquant-manifest"
_CHUNK = 1 << 20

Kind = Literal["missing", "truncated", "grown", "altered", "unreadable", "extra"]


@dataclass(frozen=True)
class Problem:
    """One file that does not match the manifest; `extra` files are only a warning."""

    kind: Kind
    path: str
    detail: str

    @property
    def fatal(self) -> bool:
        return self.kind != "extra"

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under root (the manifest itself excluded)."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST and (Path(dirpath) / name).is_file():
                out.append(rel)
    return sorted(out)


def write_manifest(model_dir: str | Path, known: dict[str, str] | None = None) -> Path:
    """Write `model_dir/manifest.json` (relative path, size, sha256 of every file), atomically.
    `known`: sha256 by relative path of files hashed as they were written (the shards), which
    are not read again."""
    from shardquant.export.shards import write_json_atomic

    root = Path(model_dir)
    known = known or {}
    entries = []
    for rel in _files(root):
        p = root / rel
        entries.append({"path": rel, "size": p.stat().st_size, "sha256": known.get(rel) or sha256_file(p)})
    manifest = {
        "format": FORMAT,
        "version": 1,
        "files": entries,
        "total_bytes": sum(e["size"] for e in entries),
    }
    path = root / MANIFEST
    write_json_atomic(path, manifest)
    return path


def _safe_rel(rel: object) -> str | None:
    """rel when it is a plain relative path inside the directory, else None."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return None
    return rel


def load_manifest(model_dir: str | Path) -> list[dict]:
    """The manifest's file entries, validated; UserError when it is absent or malformed."""
    root = Path(model_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(
            f"'{root}' has no {MANIFEST} (not a shardquant checkpoint, or exported before manifests)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"'{path}' is not a readable JSON manifest") from None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(files, list):
        raise UserError(f"'{path}' is not a {FORMAT} file")
    for e in files:
        ok = (
            isinstance(e, dict)
            and _safe_rel(e.get("path")) is not None
            and isinstance(e.get("size"), int)
            and not isinstance(e.get("size"), bool)
            and isinstance(e.get("sha256"), str)
        )
        if not ok:
            raise UserError(f"'{path}' has a malformed or unsafe entry: {json.dumps(e)[:120]}")
    return files


def verify(model_dir: str | Path) -> list[Problem]:
    """Compare a checkpoint directory with its manifest; return the problems (empty = intact).

    Sizes are compared first (a size change is reported without hashing); files of the right
    size are hashed. Files on disk that the manifest does not list come back as `extra`.
    """
    root = Path(model_dir)
    entries = load_manifest(root)
    problems: list[Problem] = []
    listed = set()
    for e in entries:
        rel, size, digest = e["path"], e["size"], e["sha256"]
        listed.add(rel)
        p = root / rel
        if not p.is_file():
            problems.append(Problem("missing", rel, f"listed with {size} bytes, not on disk"))
            continue
        try:
            actual = p.stat().st_size
            if actual != size:
                kind: Kind = "truncated" if actual < size else "grown"
                problems.append(Problem(kind, rel, f"{actual} bytes, manifest says {size}"))
                continue
            if sha256_file(p) != digest:
                problems.append(Problem("altered", rel, "sha256 differs from the manifest (same size)"))
        except OSError as err:
            problems.append(Problem("unreadable", rel, err.strerror or str(err)))
    for rel in _files(root):
        if rel not in listed:
            problems.append(Problem("extra", rel, "not in the manifest"))
    return problems

