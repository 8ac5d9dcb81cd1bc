"""Resume after a crash: real processes killed with SIGKILL or stopped with SIGINT, rerun with
the same command, and the checkpoint compared byte for byte with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_config, save_tiny_model

from shardquant.execution.spill import aio_problem


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("resume") / "llama", "llama", layers=6, shard="200KB")


def _write_cfg(model: Path, texts, out: Path, path: Path, **kw) -> Path:
    cfg = run_config(model, texts, out, **kw)
    cfg["calib"]["n_samples"] = 32
    cfg.setdefault("export", {"format": "gptq"})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cfg, *extra), capture_output=True, text=True, env=ENV, timeout=600)


def _stop_at(cfg: Path, out: Path, done: int, sig: int) -> subprocess.CompletedProcess:
    """Start a run, send `sig` once `done` blocks are saved; return the finished process."""
    proc = subprocess.Popen(_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    progress = out / "state" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= done:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before block {done}: {proc.stderr.read()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)  # a bound on hanging (a loaded machine), not a target
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json"))
    assert files and files == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json"))
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def clean_run(deep_model, texts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    cfg = _write_cfg(deep_model, texts, root / "out", root / "run.yaml")
    r = _run(cfg)
    assert r.returncode == 0, r.stderr
    return root / "out" / "model"


@pytest.mark.parametrize("block", [1, 3, 5])
def test_kill9_then_rerun_gives_identical_bytes(deep_model, texts, tmp_path, clean_run, block):
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml")
    killed = _stop_at(cfg, out, block, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model").exists()
    saved = json.loads((out / "state" / "progress.json").read_text())["done"]
    # A block is committed once the checkpoint after it is on disk, written while the next
    # block runs: the last two commits come close together, so after block 5 the kill may
    # land with every block saved and only the export left (6).
    assert block <= saved <= 6
    r = _run(cfg)
    assert r.returncode == 0, r.stderr
    assert f"resuming '{out}' at block {saved} of 6" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["cluster"]["resumed_at"] == saved
    assert [b["index"] for b in report["blocks"]] == list(range(6))
    _same_checkpoint(clean_run, out / "model")


def test_kill9_with_block_shards_gives_identical_bytes(deep_model, texts, tmp_path):
    """`export.shard_size: block`: the shards are the state files of the killed and the resumed
    run, adopted at the end, and the checkpoint is byte for byte an uninterrupted run's."""
    export = {"format": "compressed-tensors", "shard_size": "block"}
    clean = _write_cfg(deep_model, texts, tmp_path / "clean", tmp_path / "clean.yaml", export=export)
    assert _run(clean).returncode == 0
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml", export=export)
    assert _stop_at(cfg, out, 3, signal.SIGKILL).returncode == -signal.SIGKILL
    r = _run(cfg)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["shards"] == 7 and report["export"]["adopted_shards"] == 6
    _same_checkpoint(tmp_path / "clean" / "model", out / "model")


@pytest.mark.skipif(aio_problem() is not None, reason=f"cluster.spill aio: {aio_problem()}")
def test_kill9_while_spilling_then_resume_gives_identical_bytes(deep_model, texts, tmp_path, clean_run):
    """Every batch over a 20 KB budget spilled through DeepSpeed's async I/O, killed after block
    3, resumed spilling through plain files (the backend is not part of the result): the same
    checkpoint as the run that spilled nothing, and the killed run's spill files are gone."""
    out, spill_dir = tmp_path / "out", tmp_path / "spill"
    cluster = {"activation_memory": "20KB", "spill": "aio", "spill_dir": str(spill_dir)}
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml", cluster=cluster)
    killed = _stop_at(cfg, out, 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert list(spill_dir.glob("shardquant-spill-*/*.bin"))  # killed while its batches were on disk
    r = _run(cfg, "--cluster.spill=disk")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["spill"]["mode"] == "aio,disk" and report["spill"]["written_bytes"] > 0
    _same_checkpoint(clean_run, out / "model")
    assert not list(spill_dir.iterdir())


def test_sigint_stops_cleanly_and_resumes(deep_model, texts, tmp_path, clean_run):
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml")
    stopped = _stop_at(cfg, out, 2, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert "Rerun the same command to continue" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    r = _run(cfg, "--resume=true")
    assert r.returncode == 0, r.stderr
    _same_checkpoint(clean_run, out / "model")


def test_sigterm_is_a_clean_stop(deep_model, texts, tmp_path):
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml")
    stopped = _stop_at(cfg, out, 1, signal.SIGTERM)
    assert stopped.returncode == 130 and "Rerun the same command" in stopped.stderr


def test_other_config_is_refused_with_a_diff(deep_model, texts, tmp_path):
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml")
    _stop_at(cfg, out, 1, signal.SIGKILL)
    r = _run(cfg, "--quant.bits=8", "--calib.seed=3")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "unfinished run with another config" in line
    assert "calib.seed: 0 -> 3" in line and "quant.bits: 4 -> 8" in line


def test_resume_without_state_and_corrupt_state(deep_model, texts, tmp_path):
    out = tmp_path / "out"
    cfg = _write_cfg(deep_model, texts, out, tmp_path / "run.yaml")
    r = _run(cfg, "--resume=true")
    assert r.returncode == 2 and "no unfinished run to resume" in r.stderr
    _stop_at(cfg, out, 2, signal.SIGKILL)
    block0 = out / "state" / "blocks" / "block-00000.safetensors"
    data = bytearray(block0.read_bytes())
    data[-1] ^= 0xFF
    block0.write_bytes(bytes(data))
    r = _run(cfg)
    assert r.returncode == 2
    assert f"state file '{block0}' is corrupt" in r.stderr.strip().splitlines()[-1]


def test_checkpoint_written_in_the_background_is_the_snapshot(tmp_path):
    """The activation checkpoint is written while the next block runs: the file holds the
    streams as they were when the write began (the store replaces batches, never edits them),
    its sha256 is the file's, loading it gives back every stream in order, a spilling store
    is written at once, and a failed write is raised when waited for."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from shardquant.errors import UserError
    from shardquant.execution.activations import ActivationStore
    from shardquant.execution.checkpoints import ActivationCheckpointer

    store = ActivationStore()
    ck = ActivationCheckpointer(store)
    gen = torch.Generator().manual_seed(0)
    before = {
        "calib": [torch.randn(4, 64, 32, generator=gen) for _ in range(12)],
        "eval_q": [torch.randn(2, 64, 32, generator=gen) for _ in range(2)],
    }
    for stream, batches in before.items():
        store.put(stream, list(batches))
    path = tmp_path / "acts" / "acts-00001-w0.safetensors"
    ck.begin(str(path))
    store.map("calib", lambda h: h * 2 + 1)  # the next block replaces the stream meanwhile
    digest = ck.end()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = load_file(str(path))
    assert set(saved) == {f"{s}.{i:06d}" for s, bs in before.items() for i in range(len(bs))}
    assert all(torch.equal(saved[f"calib.{i:06d}"], b) for i, b in enumerate(before["calib"]))
    assert ck.end() is None  # nothing pending any more
    # Loading replaces every stream of another store with the snapshot, batches in order.
    other = ActivationStore()
    other.put("calib_next", [torch.zeros(1)])
    ActivationCheckpointer(other).load(path)
    assert sorted(other.streams()) == ["calib", "eval_q"]
    for stream, batches in before.items():
        got = list(other.iter(stream))
        assert len(got) == len(batches) and all(torch.equal(a, b) for a, b in zip(got, batches, strict=True))
    # A store over its memory budget (spilled batches) is written before `begin` returns.
    spilling = ActivationStore(budget=40_000, spill_dir=str(tmp_path))
    spilling.put("calib", list(before["calib"]))
    assert spilling.spilled > 0
    sync = ActivationCheckpointer(spilling)
    sync_path = tmp_path / "acts" / "spilled.safetensors"
    sync.begin(sync_path)
    assert sync_path.exists()
    assert sync.end() == hashlib.sha256(sync_path.read_bytes()).hexdigest()
    assert all(torch.equal(load_file(str(sync_path))[f"calib.{i:06d}"], b) for i, b in enumerate(before["calib"]))
    sync.close()
    spilling.clear()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "acts").write_text("a file where a folder should be")
    ck.begin(str(tmp_path / "ro" / "acts" / "x.safetensors"))
    with pytest.raises((OSError, UserError)):
        ck.end()
    ck.close()
