"""Accumulation of GPTQ's Hessian from calibration activations."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianAccumulator:
    """Exact ``(sum, count)`` accumulation of X^T X over rows of activations.

    Keeping the raw sum and row count (never a running mean) lets partial results from many
    workers and batches be merged by plain addition, so N workers give the same Hessian as
    one even when they saw different numbers of tokens.

    X^T X is symmetric, so only its upper triangle is accumulated, in row panels of `panel`
    rows (one matmul each): about half the flops of the full product for wide inputs.
    `sum` holds that triangle (the rest is not meaningful); `hessian()` mirrors it in one new
    matrix, or, with ``consume=True``, in `sum` itself for a solver that takes the buffer over.
    """

    sum: Tensor
    count: int

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        panel: int = 256,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulation dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.panel = panel
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.count = 0
        self.consumed = False

    def add(self, x: Tensor) -> None:
        """Add activations ``x`` [..., in]; every leading index is one row."""
        if self.consumed:
            raise ValueError("this accumulator's buffer was consumed by hessian(consume=True)")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features).to(device=self.sum.device, dtype=self.sum.dtype)
        d, b = self.in_features, self.panel
        for i in range(0, d, b):
            self.sum[i : i + b, i:].addmm_(rows[:, i : i + b].T, rows[:, i:])
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's rows into this one."""
        if self.consumed or other.consumed:
            raise ValueError("cannot merge an accumulator consumed by hessian(consume=True)")
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge {other.in_features} features into {self.in_features}")
        self.sum += other.sum.to(device=self.sum.device, dtype=self.sum.dtype)
        self.count += other.count

    def gram(self) -> Tensor:
        """The full ``X^T X`` (the accumulated triangle, mirrored) in one new in×in matrix."""
        self._check_filled()
        return mirror_upper_(self.sum.clone(), self.panel)

    def hessian(self, *, consume: bool = False) -> Tensor:
        """GPTQ's H = 2 X^T X / n, in one new in×in matrix.

        With ``consume`` H is built in the accumulator's own buffer instead (no copy: the
        solver can then factorize in it), and the accumulator is spent: ``sum`` is dropped and
        any later use raises.
        """
        self._check_filled()
        if consume:
            H, self.sum = self.sum, torch.empty(0, device=self.sum.device, dtype=self.sum.dtype)
            self.consumed = True
        else:
            H = self.sum.clone()
        return mirror_upper_(H, self.panel).mul_(2).div_(self.count)

    def _check_filled(self) -> None:
        if self.consumed:
            raise ValueError("this accumulator's buffer was consumed by hessian(consume=True)")
        if self.count == 0:
            raise ValueError("no activations were added; the Hessian is undefined")


def mirror_upper_(m: Tensor, panel: int = 256) -> Tensor:
    """Overwrite the strict lower triangle of square ``m`` with its upper triangle, in place.

    Goes by row panels so nothing larger than a panel is allocated; each panel's lower part
    comes from columns of rows above it, which no earlier panel wrote. Returns ``m``.
    """
    n = m.shape[0]
    for i in range(0, n, panel):
        j = min(i + panel, n)
        if i:
            m[i:j, :i].copy_(m[:i, i:j].T)
        diag = m[i:j, i:j]
        diag.copy_(diag.triu() + diag.triu(1).T)
    return m
