"""Where activations beyond a worker's memory budget go (`cluster.spill`), and how they come back.

A backend writes each spilled batch's bytes to a file of its own and reads them back on a
background thread, so an `ActivationStore` reads the next batch while the current one
computes and writes a finished batch while the next one computes. At most one write is in
flight (a second waits for the first, so a slow disk slows the compute instead of filling
memory), and reads go one batch ahead.

- `FileSpill` (`disk`): plain files through the operating system's file I/O.
- `AioSpill` (`aio`): DeepSpeed's async I/O handle (libaio, O_DIRECT) through page-locked
  buffers that DeepSpeed allocates, one for reading and one for writing, padded to its
  alignment. DeepSpeed compiles the op on first use (a few minutes, once per environment:
  `$TORCH_EXTENSIONS_DIR`, by default `<venv>/torch_extensions`; a killed build's stale lock is
  cleared by the next).

`resolve` turns `auto` into one of them; `aio_problem` says why `aio` cannot run here. Values
come back exactly (the same bytes) either way. Nothing here imports torch at module level
except through the backends, so `shardquant plan` may call `resolve` and `aio_problem`.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardquant.errors import UserError

if TYPE_CHECKING:
    import torch

MODES = ("auto", "none", "disk", "aio")
# File systems on a local block device, which take O_DIRECT: `auto` picks aio only on these.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "jfs", "reiserfs", "bcachefs"})
INSTALL_DEEPSPEED = "pip install 'shardquant[deepspeed]'"
INSTALL_LIBAIO = "apt-get install libaio-dev"
# DeepSpeed's AIO settings for swapping (its `aio` config defaults): 1 MiB blocks, 8 in flight.
AIO_BLOCK_SIZE = 1 << 20
AIO_QUEUE_DEPTH = 8
AIO_THREADS = 1
PAD = 4096  # spilled aio files are padded to this many bytes (O_DIRECT wants whole sectors)


# --- choosing ---------------------------------------------------------------------------------


def _libaio_present() -> bool:
    """libaio's shared library and its header (DeepSpeed compiles its op against both)."""
    if ctypes.util.find_library("aio") is None:
        return False
    dirs = ["/usr/include", "/usr/local/include"]
    for var in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"):
        dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    return any(Path(d, "libaio.h").is_file() for d in dirs)


def aio_problem() -> str | None:
    """Why `cluster.spill: aio` cannot run in this environment (with the install step), or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return f"DeepSpeed is not installed ({INSTALL_DEEPSPEED})"
    if not _libaio_present():
        return f"libaio is not installed ({INSTALL_LIBAIO})"
    return None


def spill_root(spill_dir: str | None) -> Path:
    """The directory spilled files go under: `cluster.spill_dir`, else the temp directory."""
    return Path(spill_dir).expanduser() if spill_dir else Path(tempfile.gettempdir())


def filesystem(path: Path) -> str | None:
    """The file system type of the mount holding `path` (from /proc/mounts), None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def resolve(mode: str, spill_dir: str | None) -> str:
    """`cluster.spill` as the backend that runs: `auto` is aio where DeepSpeed and libaio are
    present and the spill directory is on a local file system (`LOCAL_FILESYSTEMS`), else disk."""
    if mode != "auto":
        return mode
    if aio_problem() is None and filesystem(spill_root(spill_dir)) in LOCAL_FILESYSTEMS:
        return "aio"
    return "disk"


def check(mode: str) -> None:
    """Refuse `cluster.spill: aio` where it cannot run (UserError naming the install step)."""
    if mode == "aio" and (problem := aio_problem()):
        raise UserError(f"cluster.spill aio: {problem}")


# --- the files ----------------------------------------------------------------------------------


def spill_dir_for(root: Path, tag: str) -> Path:
    """A fresh directory for one store's files under `root`, named after this host and process;
    directories of this host's processes that are gone (a killed run) are removed first."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"shardquant-spill-*-{host}-*"):
        parts = old.name.split("-")
        if len(parts) >= 6 and parts[4].isdigit() and not _alive(int(parts[4])):
            for f in old.glob("*"):
                f.unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                pass
    return Path(tempfile.mkdtemp(prefix=f"shardquant-spill-{tag}-{host}-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@dataclass
class Spilled:
    """A batch on disk: its file, what it was, and the write that puts it there."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    written: Future[None]


@dataclass
class SpillStats:
    """Bytes moved and the seconds the I/O took (on its threads), and the seconds the compute
    waited for a read or for room to write."""

    written_bytes: int = 0
    read_bytes: int = 0
    write_s: float = 0.0
    read_s: float = 0.0
    wait_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **values: float) -> None:
        with self._lock:
            for k, v in values.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, Any]:
        return {"written_bytes": self.written_bytes, "read_bytes": self.read_bytes, "write_s": self.write_s,
                "read_s": self.read_s, "wait_s": self.wait_s}


def _u8(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes as a flat uint8 view (any dtype, bfloat16 included)."""
    import torch

    return t.reshape(-1).view(torch.uint8)


class SpillBackend:
    """One background thread writes, one reads; subclasses move the bytes."""

    mode = ""

    def __init__(self) -> None:
        self.stats = SpillStats()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-spill-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-spill-read")
        self._last_write: Future[None] | None = None

    def write(self, t: torch.Tensor, path: Path) -> Spilled:
        """Start writing `t` to `path` once the previous write is done; `t` is kept (not
        copied) until its write ends, and must not change in place meanwhile."""
        t = t.detach().contiguous()
        if self._last_write is not None:
            w = time.perf_counter()
            self._last_write.result()
            self.stats.add(wait_s=time.perf_counter() - w)
        n = t.numel() * t.element_size()
        fut = self._writer.submit(self._timed_write, t, path, n)
        self._last_write = fut
        return Spilled(path, tuple(t.shape), t.dtype, n, fut)

    def read(self, item: Spilled, device: torch.device) -> Future[torch.Tensor]:
        """Start reading `item` back (after its write) onto `device`."""
        return self._reader.submit(self._timed_read, item, device)

    def remove(self, item: Spilled) -> None:
        """Delete `item`'s file (after its write)."""
        try:
            item.written.result()
        except Exception:  # noqa: BLE001 - a failed write leaves nothing worth keeping
            pass
        item.path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait for the pending write (re-raising its error)."""
        if self._last_write is not None:
            self._last_write.result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    def _timed_write(self, t: torch.Tensor, path: Path, n: int) -> None:
        start = time.perf_counter()
        try:
            self._write(t.cpu(), path, n)
        except OSError as e:
            raise OSError(e.errno, f"writing spilled activations to '{path}': {e.strerror or e}") from None
        self.stats.add(written_bytes=n, write_s=time.perf_counter() - start)

    def _timed_read(self, item: Spilled, device: torch.device) -> torch.Tensor:
        import torch

        item.written.result()
        start = time.perf_counter()
        out = torch.empty(item.shape, dtype=item.dtype)
        self._read(item, out)
        self.stats.add(read_bytes=item.nbytes, read_s=time.perf_counter() - start)
        return out if device.type == "cpu" else out.to(device)

    def _write(self, t: torch.Tensor, path: Path, n: int) -> None:
        raise NotImplementedError

    def _read(self, item: Spilled, out: torch.Tensor) -> None:
        raise NotImplementedError


class FileSpill(SpillBackend):
    """Plain files, unbuffered reads and writes straight from and into the tensors' memory."""

    mode = "disk"

    def _write(self, t: torch.Tensor, path: Path, n: int) -> None:
        view = memoryview(_u8(t).numpy())
        with open(path, "wb", buffering=0) as f:
            done = 0
            while done < n:
                done += f.write(view[done:])

    def _read(self, item: Spilled, out: torch.Tensor) -> None:
        view = memoryview(_u8(out).numpy())
        with open(item.path, "rb", buffering=0) as f:
            done = 0
            while done < item.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise OSError(f"spilled activations '{item.path}' end after {done} of {item.nbytes} bytes")
                done += got


_AIO_OP: Any = None
_AIO_LOCK = threading.Lock()


def aio_op() -> Any:
    """DeepSpeed's async I/O op, built on first use (UserError naming the install step when it
    cannot be: no DeepSpeed, no libaio)."""
    global _AIO_OP
    with _AIO_LOCK:
        if _AIO_OP is None:
            check("aio")
            from deepspeed.ops.op_builder import AsyncIOBuilder

            builder = AsyncIOBuilder()
            if not builder.is_compatible(verbose=False):
                raise UserError(f"cluster.spill aio: DeepSpeed cannot build its async I/O op here "
                                f"(libaio missing? {INSTALL_LIBAIO})")
            print("shardquant: loading DeepSpeed's async I/O op (built once per environment: minutes)",
                  file=sys.stderr)
            # Built per environment: a build's command line names the venv's headers, so two
            # environments sharing torch's default cache would rebuild it in turn.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
            with _build_lock():
                _AIO_OP = builder.load(verbose=False)
        return _AIO_OP


@contextmanager
def _build_lock() -> Iterator[None]:
    """Hold an flock over torch's extension builds while DeepSpeed builds or loads its op.

    torch marks a build in progress with a plain `lock` file in the op's build directory and
    waits for it to go; a build that was killed leaves it behind, and every later load then
    waits forever. The flock dies with its process, so whoever holds it knows that a `lock`
    file left by another shardquant process is stale, and removes it."""
    import fcntl

    from torch.utils import cpp_extension

    try:
        root = Path(cpp_extension._get_build_directory("async_io", verbose=False)).parent
    except Exception:  # a private helper: without it, build as torch would
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".shardquant-build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            for stale in root.glob("*/lock"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class AioSpill(SpillBackend):
    """DeepSpeed's AIO handles (one reads, one writes) with page-locked buffers of their own."""

    mode = "aio"

    def __init__(self) -> None:
        import torch

        op = aio_op()
        super().__init__()
        args = (AIO_BLOCK_SIZE, AIO_QUEUE_DEPTH, False, True, AIO_THREADS)
        self._rh, self._wh = op.aio_handle(*args), op.aio_handle(*args)
        self._pad = max(PAD, self._rh.get_alignment())
        self._example = torch.empty(0, dtype=torch.uint8)
        self._bufs: dict[str, torch.Tensor | None] = {"r": None, "w": None}

    def _padded(self, n: int) -> int:
        return max(self._pad, -(-n // self._pad) * self._pad)

    def _buffer(self, which: str, n: int) -> torch.Tensor:
        """The page-locked buffer of the reader or the writer, grown to hold `n` bytes."""
        handle = self._rh if which == "r" else self._wh
        buf = self._bufs[which]
        if buf is None or buf.numel() < n:
            if buf is not None:
                handle.free_cpu_locked_tensor(buf)
            buf = handle.new_cpu_locked_tensor(n, self._example)
            self._bufs[which] = buf
        return buf

    def _write(self, t: torch.Tensor, path: Path, n: int) -> None:
        size = self._padded(n)
        buf = self._buffer("w", size)
        buf[:n].copy_(_u8(t))
        if self._wh.sync_pwrite(buf[:size], str(path)) < 0:
            raise OSError(5, "DeepSpeed's async I/O write failed")

    def _read(self, item: Spilled, out: torch.Tensor) -> None:
        size = self._padded(item.nbytes)
        buf = self._buffer("r", size)
        if self._rh.sync_pread(buf[:size], str(item.path)) < 0:
            raise OSError(5, f"DeepSpeed's async I/O read of '{item.path}' failed")
        _u8(out).copy_(buf[:item.nbytes])

    def close(self) -> None:
        super().close()
        for which, handle in (("r", self._rh), ("w", self._wh)):
            buf = self._bufs[which]
            if buf is not None:
                handle.free_cpu_locked_tensor(buf)
            self._bufs[which] = None


BACKENDS: dict[str, type[SpillBackend]] = {"disk": FileSpill, "aio": AioSpill}
