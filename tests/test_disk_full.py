"""A disk that fills up during export: exit 2, one line naming the file, no output/model.

The run's output lives on a real size-limited filesystem: a tmpfs mounted in a private mount
namespace (`unshare`; as root, or as a user through a user namespace), sized from a measured
run so the block state fits and the final shards do not. If no small filesystem can be had,
the test fails: it never skips. A second test hits the file-size limit (RLIMIT_FSIZE, EFBIG).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_config

from shardquant.config import build_config
from shardquant.pipeline import quantize

PAGE = 4096
# Inside the namespace: mount, run the CLI, list what is left on the small filesystem.
SCRIPT = (
    'mount -t tmpfs -o "size=$1" shardquant-test "$2" || exit 97; shift 2; '
    '"$@"; rc=$?; find "$MNT" -mindepth 1 -printf "%P\\n" | sort > "$LISTING"; exit $rc'
)


def small_run_config(model: Path, texts: dict[str, Path], output: Path) -> dict:
    """Few short calibration windows (small activations), no evaluation: the export dominates."""
    return run_config(model, texts, output, quant={"method": "rtn"}, eval={"enabled": False},
                      calib={"n_samples": 4, "seq_len": 32, "batch_size": 4})


def pages(directory: Path) -> int:
    return sum(-(-f.stat().st_size // PAGE) for f in directory.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def measured(tiny_models, texts, tmp_path_factory) -> dict:
    """One real run on the normal disk: the pages its state and its checkpoint take."""
    out = tmp_path_factory.mktemp("measure") / "out"
    quantize(build_config(small_run_config(tiny_models["qwen2"], texts, out)), show_progress=False)
    shards = sorted((out / "model").glob("*.safetensors"))
    return {
        "model_pages": pages(out / "model"),
        "biggest_shard": max(f.stat().st_size for f in shards),
        "out": out,
    }


def run_on_tmpfs(tmp_path: Path, size: int, argv: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run argv with a `size`-byte tmpfs mounted at tmp_path/mnt; return the process and the
    files left on the tmpfs. Fails the test when no way to mount one works."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    listing = tmp_path / "left-on-tmpfs.txt"
    env = {**os.environ, "MNT": str(mnt), "LISTING": str(listing)}
    attempts = [["unshare", "--mount", "--propagation", "private"]] if os.geteuid() == 0 else []
    attempts.append(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])
    tried = []
    for prefix in attempts:
        if shutil.which(prefix[0]) is None:
            tried.append(f"{prefix[0]}: not installed")
            continue
        proc = subprocess.run([*prefix, "sh", "-c", SCRIPT, "sh", str(size), str(mnt), *argv],
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 97 and listing.exists():
            return proc, [ln for ln in listing.read_text().splitlines() if ln]
        tried.append(f"{' '.join(prefix)}: rc {proc.returncode}: {proc.stderr.strip()[-300:]}")
    pytest.fail("could not get a size-limited filesystem for the disk-full test:\n" + "\n".join(tried))


@pytest.mark.parametrize("eighths, where", [
    # Room for about half of what a run writes (its per-block state, then the checkpoint
    # assembled from it): some file cannot be finished.
    (4, r"[^']+"),
    # Room for an eighth: a block state file, written in the background while the next block
    # calibrates, cannot be finished. Its error still ends the run cleanly.
    (1, r"state/blocks/block-\d+\.safetensors"),
], ids=["export", "block-state"])
def test_disk_full(tmp_path, tiny_models, texts, measured, eighths, where):
    size = (measured["model_pages"] * eighths // 8 + 2) * PAGE
    out = tmp_path / "mnt" / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(small_run_config(tiny_models["qwen2"], texts, out)))
    proc, left = run_on_tmpfs(tmp_path, size, [sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"])

    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"shardquant: error: no space left on device while writing "
        rf"'{re.escape(str(out))}/{where}\.tmp'; "
        r"free space \(or raise the limit\) and rerun",
        lines[0],
    ), lines[0]
    assert not any(p == "out/model" or p.startswith("out/model/") for p in left), left
    assert not any(p.endswith(".tmp") for p in left), f"a torn temp file was left: {left}"


def test_file_size_limit_then_resume(tmp_path, tiny_models, texts, measured):
    """RLIMIT_FSIZE below the biggest shard: EFBIG while writing some file, exit 2, nothing torn;
    the same command without the limit then finishes with the clean run's bytes."""
    limit = measured["biggest_shard"] // 2
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(small_run_config(tiny_models["qwen2"], texts, out)))

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, preexec_fn=cap_file_size)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"shardquant: error: file too large for the filesystem or the file-size limit \(ulimit -f\) "
        rf"while writing '{re.escape(str(out))}/[^']+\.tmp'; "
        r"free space \(or raise the limit\) and rerun",
        lines[0],
    ), lines[0]
    assert not (out / "model").exists()
    assert not [p for p in out.rglob("*.tmp")], "a torn temp file was left"
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    for shard in sorted((measured["out"] / "model").glob("*.safetensors")):
        assert shard.read_bytes() == (out / "model" / shard.name).read_bytes(), shard.name


def test_disk_full_recognized_however_it_arrives():
    """An OSError (also wrapped), safetensors' Rust I/O error, or a remote worker's traceback
    text; anything else is not a disk-full error."""
    import errno

    from shardquant.cli import _disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/run/x.tmp")
        except OSError as inner:
            raise RuntimeError("block 3 failed") from inner
    except RuntimeError as e:
        assert _disk_full(e) == ("no space left on device", "/run/x.tmp")
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _disk_full(rust) == ("no space left on device", None)
    remote = Exception("ray.exceptions.RayTaskError(OSError): ray::Worker.assemble()\n  File \"x.py\", line 3\n"
                       "OSError: [Errno 122] Disk quota exceeded: '/scratch/out/.model.partial/m.safetensors.tmp'")
    assert _disk_full(remote) == ("disk quota exceeded", "/scratch/out/.model.partial/m.safetensors.tmp")
    assert _disk_full(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert _disk_full(ValueError("[Errno 2] nothing to see")) is None
