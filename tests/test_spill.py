"""Spilled activations (`cluster.spill`): the store's backends give back the exact bytes, read
one batch ahead, clean up after themselves and after killed runs; `aio` is refused with the
install step where DeepSpeed or libaio is missing. (End-to-end runs: tests/test_ray.py and
tests/test_resume.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from shardquant.errors import UserError
from shardquant.execution import spill
from shardquant.execution.activations import ActivationStore
from shardquant.execution.spill import Spilled

MODES = ["disk", pytest.param("aio", marks=pytest.mark.skipif(spill.aio_problem() is not None,
                                                               reason=f"aio: {spill.aio_problem()}"))]


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(2, 8, 16, generator=gen) for _ in range(5)]
    out.append(torch.randn(3, 7, 5, generator=gen).to(torch.bfloat16))  # odd byte count, bfloat16
    out.append(torch.randn(1, 8, 16, generator=gen))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("mode", MODES)
def test_spilled_batches_come_back_exactly(mode, tmp_path):
    """Over the budget, batches go to files holding their raw bytes; iterating and mapping give
    the exact values (torch.equal against the originals and fn applied to them); the counters
    match the bytes moved; clear() removes every file."""
    batches = _batches()
    store = ActivationStore(budget=2 * _nbytes(batches[0]), spill_dir=str(tmp_path), tag="t0", spill=mode)
    assert store.mode == mode
    store.put("calib", batches)
    store.flush()  # the last write may still be in flight
    spilled = batches[2:]
    assert store.spilled == sum(_nbytes(b) for b in spilled) and store.in_memory == 2 * _nbytes(batches[0])
    files = sorted(tmp_path.glob("shardquant-spill-t0-*/*"))
    assert len(files) == len(spilled)
    for f, b in zip(files, spilled, strict=True):
        data = f.read_bytes()
        raw = b.view(torch.uint8).numpy().tobytes() if b.dtype == torch.bfloat16 else b.numpy().tobytes()
        if mode == "disk":
            assert data == raw
        else:  # O_DIRECT: padded to whole 4 KiB pages
            assert data[: len(raw)] == raw and len(data) % 4096 == 0
    got = list(store.iter("calib"))
    assert len(got) == len(batches)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, batches, strict=True))
    assert store.meta("calib") == [(b.dtype, tuple(b.shape)) for b in batches]
    store.map("calib", lambda h: h * 3 - 1)
    want = [b * 3 - 1 for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(store.iter("calib"), want, strict=True))
    stats = store.stats()
    assert stats["mode"] == mode
    n = sum(_nbytes(b) for b in spilled)
    assert stats["written_bytes"] == 2 * n  # the put, then map's outputs
    assert stats["read_bytes"] == 3 * n  # iter, map, iter
    assert stats["write_s"] > 0 and stats["read_s"] > 0
    assert store.stats()["read_bytes"] == 0  # a delta since the last call
    store.clear()
    assert not list(tmp_path.glob("shardquant-spill-*"))


@pytest.mark.parametrize("mode", MODES)
def test_the_next_batch_is_read_while_the_current_one_is_in_use(mode, tmp_path):
    """Holding spilled batch i, batch i+1's read completes without the consumer asking for it
    (read ahead); a synchronous store would never read it, and the wait below would fail."""
    batches = [torch.full((4, 64), float(i)) for i in range(4)]
    store = ActivationStore(budget=0, spill_dir=str(tmp_path), spill=mode)
    store.put("s", batches)
    backend = store._spiller()
    one = _nbytes(batches[0])
    for i, h in enumerate(store.iter("s")):
        assert torch.equal(h, batches[i])
        if i + 1 < len(batches):
            deadline = time.monotonic() + 60
            while backend.stats.read_bytes < (i + 2) * one and time.monotonic() < deadline:
                time.sleep(0.005)
            assert backend.stats.read_bytes == (i + 2) * one, f"batch {i + 1} was not read ahead"
    store.clear()


def test_stats_count_a_write_still_in_flight(tmp_path):
    """A block's record (`stats()`) is taken right after its last batch is handed to the writer:
    the bytes of that write count in this record, not in the next one (or, after the last
    block, in none). The write below is held until 0.3 s after it starts."""
    store = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="disk")
    backend = store._spiller()
    plain, release = backend._write, threading.Event()

    def held(t, path, n):
        threading.Timer(0.3, release.set).start()
        release.wait(10)
        plain(t, path, n)

    backend._write = held
    batch = torch.ones(4, 64)
    store.put("s", [batch])
    assert store.stats()["written_bytes"] == _nbytes(batch)
    assert torch.equal(next(store.iter("s")), batch)
    store.clear()


def test_none_refuses_to_spill(tmp_path):
    store = ActivationStore(budget=100, spill_dir=str(tmp_path), tag="w1", spill="none")
    store.put("a", [torch.zeros(10)])  # 40 B fit
    with pytest.raises(UserError, match=r"^cluster.spill none: the activations exceed cluster.activation_memory "
                                        r"\(100 B on worker w1\); raise it"):
        store.put("b", [torch.zeros(20)])
    assert not list(tmp_path.iterdir())


def test_a_write_that_fails_names_the_file(tmp_path):
    store = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="disk")
    store.put("a", [torch.zeros(8)])
    (item,) = store._streams["a"]
    assert isinstance(item, Spilled)
    item.written.result()
    item.path.parent.rename(tmp_path / "gone")  # the directory vanishes under the store
    with pytest.raises(OSError, match="writing spilled activations to '.*00000002.bin'"):
        store.put("b", [torch.zeros(8)])
        store.flush()


def test_stale_spill_directories_of_dead_processes_are_removed(tmp_path):
    """A killed run leaves its spill directory: the next store under the same root removes
    those of this host's processes that are gone, and keeps a live process's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="disk")
    store.put("a", [torch.zeros(4)])
    mine = next(tmp_path.glob("shardquant-spill-*"))
    host = mine.name.split("-")[3]
    stale = tmp_path / f"shardquant-spill-w0-{host}-{dead.pid}-abc_12"
    stale.mkdir()
    (stale / "00000001.bin").write_bytes(b"x" * 10)
    alive = tmp_path / f"shardquant-spill-w1-{host}-{mine.name.split('-')[4]}-xyz"
    alive.mkdir()
    other = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="disk")
    other.put("a", [torch.zeros(4)])
    assert not stale.exists() and alive.exists() and mine.exists()
    store.clear()
    other.clear()


def test_aio_without_deepspeed_or_libaio_names_the_install_step(monkeypatch, tiny_models, texts, tmp_path,
                                                               capsys):
    """`cluster.spill: aio` where DeepSpeed or libaio is missing: one line naming the install
    step, exit 2, before any weight is read; `auto` then picks disk. `none` over a cap: the
    same, before anything is written."""
    import importlib.util

    import yaml
    from conftest import run_config

    from shardquant.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert spill.aio_problem() == "DeepSpeed is not installed (pip install 'shardquant[deepspeed]')"
    assert spill.resolve("auto", str(tmp_path)) == "disk"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    assert main(["quantize", str(cfg), "--quiet", "--cluster.spill=aio"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("cluster.spill aio: DeepSpeed is not installed (pip install 'shardquant[deepspeed]')")
    assert not (tmp_path / "out" / "state").exists()
    # `none` with activations over an explicit cap: refused before any state is written.
    assert main(["quantize", str(cfg), "--quiet", "--cluster.spill=none", "--cluster.activation_memory=20KB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("cluster.spill none: the activations per worker (524288 B) exceed "
                            "cluster.activation_memory (20000 B); raise it, or let them spill (cluster.spill: auto)")
    assert not (tmp_path / "out" / "state").exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(spill.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(UserError, match=r"^cluster.spill aio: libaio is not installed \(apt-get install libaio-dev\)$"):
        spill.check("aio")


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs util-linux findmnt")
def test_auto_picks_aio_only_on_a_local_file_system(tmp_path):
    """The spill directory's file system, read from /proc/mounts, agrees with findmnt; auto is
    aio there when DeepSpeed and libaio are present and the file system is a local one."""
    for path in (tmp_path, "/dev/shm", "/proc"):
        want = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)], capture_output=True,
                              text=True).stdout.split()
        if want:
            assert spill.filesystem(path) == want[-1]
    local = spill.filesystem(tmp_path) in spill.LOCAL_FILESYSTEMS
    want = "aio" if spill.aio_problem() is None and local else "disk"
    assert spill.resolve("auto", str(tmp_path)) == want
    assert spill.resolve("auto", "/proc") == "disk"
    assert spill.resolve("disk", "/proc") == "disk"


def test_auto_falls_back_to_plain_files_when_aio_fails_to_load(monkeypatch, tmp_path, capsys):
    """`auto` resolved to aio whose op does not load (a failed build): the store says so once
    and spills to plain files; an explicit `aio` is a one-line error instead."""

    class Unbuildable(spill.SpillBackend):
        def __init__(self) -> None:
            raise RuntimeError("Error building extension 'async_io'\nninja: build stopped")

    monkeypatch.setitem(spill.BACKENDS, "aio", Unbuildable)
    monkeypatch.setattr(spill, "resolve", lambda mode, d: "aio" if mode in ("auto", "aio") else mode)
    store = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="auto")
    batches = _batches()
    store.put("s", batches)
    assert store.mode == "disk" and store.stats()["mode"] == "disk"
    assert "cluster.spill auto: DeepSpeed's async I/O failed (RuntimeError" in capsys.readouterr().err
    assert all(torch.equal(a, b) for a, b in zip(store.iter("s"), batches, strict=True))
    store.clear()
    strict = ActivationStore(budget=0, spill_dir=str(tmp_path), spill="aio")
    with pytest.raises(UserError, match=r"^cluster.spill aio: DeepSpeed's async I/O op cannot be loaded: "
                                        r"Error building extension 'async_io'$"):
        strict.put("s", batches)
