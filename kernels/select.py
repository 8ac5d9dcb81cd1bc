"""Which implementation runs: a Triton kernel or its plain-torch reference.

``mode`` is ``kernels.mode`` of the run (``set_mode``, process-wide: every worker sets its
own): ``auto`` runs a kernel on a CUDA tensor when triton imports, ``torch`` always runs the
reference, ``triton`` always runs the kernel where it applies and fails where triton cannot
run (no triton, or a CPU tensor outside triton's interpreter, ``TRITON_INTERPRET=1``). Every
choice is tallied by kernel name (``take_ran``), so a run can report which ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Mode = Literal["auto", "triton", "torch"]
MODES: tuple[str, ...] = ("auto", "triton", "torch")

GPTQ_MAX_BLOCK = 256  # columns one GPTQ block launch holds (kernels.gptq; known here without triton)

_mode: str = "auto"
_ran: dict[str, set[str]] = {}


def set_mode(mode: str) -> None:
    """Set this process's kernel mode (``auto``, ``triton`` or ``torch``)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    """This process's kernel mode."""
    return _mode


@contextmanager
def using(mode: str) -> Iterator[None]:
    """Run the body under kernel ``mode``, restoring the previous mode after."""
    old = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(old)


@cache
def triton_error() -> str | None:
    """Why triton cannot be imported, or None when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{type(e).__name__}: {e}"
    return None


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def chooses(device: torch.device) -> bool:
    """Whether a kernel ``use_triton`` is asked about (a case it supports) runs in Triton on
    ``device`` under this process's mode; nothing is tallied (a caller deciding ahead, e.g.
    to keep a packed weight packed)."""
    if _mode == "torch" or triton_error() is not None:
        return False
    return device.type == "cuda" or (_mode == "triton" and interpreting() and device.type == "cpu")


def use_triton(kernel: str, t: Tensor, supported: bool = True) -> bool:
    """Whether ``kernel`` runs in Triton on tensors like ``t``, tallied under ``kernel``.

    ``supported`` is the caller's word that the kernel covers this case (dtype, options); a
    case it does not cover runs the reference in every mode. Mode ``triton`` raises
    RuntimeError where triton cannot run on ``t``.
    """
    choice = False
    if _mode != "torch" and supported:
        err = triton_error()
        runs = err is None and (t.is_cuda or (interpreting() and t.device.type == "cpu"))
        if _mode == "triton" and not runs:
            why = err or f"a {t.device.type} tensor needs a CUDA device or TRITON_INTERPRET=1"
            raise RuntimeError(f"kernels.mode is 'triton' but the {kernel} kernel cannot run: {why}")
        choice = chooses(t.device)
    _ran.setdefault(kernel, set()).add("triton" if choice else "torch")
    return choice


def take_ran() -> dict[str, str]:
    """What each kernel ran with since the previous call (``triton``, ``torch``, or
    ``torch+triton`` when both did); clears the tally."""
    out = {k: "+".join(sorted(v)) for k, v in sorted(_ran.items())}
    _ran.clear()
    return out
