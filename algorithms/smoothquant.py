"""SmoothQuant scales and the per-channel absolute maximum they (and static input scales) need.

SmoothQuant (Xiao et al., 2023) migrates activation outliers into the weights: for linears
sharing an input ``x`` and ``s > 0`` per input channel, ``x W^T = (x / s) (W * s)^T`` (the same
exact folding as AWQ, ``awq.py``), with

    s_j = max|x_j| ** alpha / max_i |W_ij| ** (1 - alpha)

(the max over the group's linears' rows), so the inputs' channel ranges even out and the
inputs quantize with less error. `smooth_statistic` gives ``max|x_j|`` or, as llm-compressor
does, half the range ``(max x_j - min x_j) / 2``; `ChannelMax` keeps what both need. Pure
tensor math.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_MIN = 1e-5  # scales are clamped to at least this (a channel that never fired)


class ChannelMax:
    """Per input channel over every row added: ``max x`` and ``max -x`` (``signed`` [2, in],
    -inf before any row), so both the absolute maximum and the range merge exactly (by max)
    across batches and workers."""

    signed: Tensor

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.signed = torch.full((2, in_features), -torch.inf, device=device, dtype=torch.float32)

    def add(self, x: Tensor) -> None:
        """Add activations ``x`` [..., in]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features)
        if rows.shape[0]:
            # two reductions: on CPU torch's aminmax over dim 0 is ~10x slower than both together
            got = torch.stack([rows.amax(0), rows.amin(0).neg_()]).to(device=self.signed.device, dtype=torch.float32)
            torch.maximum(self.signed, got, out=self.signed)

    @property
    def max(self) -> Tensor:
        """``max |x|`` per channel (0 where no row came)."""
        return channel_absmax(self.signed)

    def merge(self, other: ChannelMax) -> None:
        """Take the max with another accumulator."""
        m = other.signed
        if m.shape != self.signed.shape:
            raise ValueError(f"cannot merge {tuple(m.shape)} into {tuple(self.signed.shape)}")
        torch.maximum(self.signed, m.to(device=self.signed.device, dtype=torch.float32), out=self.signed)


def channel_absmax(signed: Tensor) -> Tensor:
    """``max |x|`` per channel from a `ChannelMax.signed` [2, in] (0 where no row came)."""
    return signed.amax(0).clamp(min=0)


def channel_range(signed: Tensor) -> Tensor:
    """``max x - min x`` per channel from a `ChannelMax.signed` [2, in] (0 where no row came)."""
    return signed.sum(0).clamp(min=0)


def smooth_statistic(signed: Tensor, stat: str) -> Tensor:
    """The activation side of SmoothQuant's scales: ``absmax`` (the paper's max|x|) or ``range``
    ((max x - min x) / 2, llm-compressor's statistic, halved so both agree on a channel
    symmetric around zero)."""
    if stat == "absmax":
        return channel_absmax(signed)
    if stat == "range":
        return channel_range(signed) / 2
    raise ValueError(f"unknown SmoothQuant statistic {stat!r}")


def weight_column_max(weights: list[Tensor]) -> Tensor:
    """``max_i |W_ij|`` per input column ``j`` over the rows of all ``weights`` [out, in]."""
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)


def smooth_scales(x_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """``x_max ** alpha / w_max ** (1 - alpha)`` (float32), 1 where a channel never fired or a
    column's weights are all zero (nothing to migrate), at least ``SCALE_MIN``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x_max, w_max = x_max.float(), w_max.float().to(x_max.device)
    s = x_max.pow(alpha) / w_max.clamp(min=torch.finfo(torch.float32).tiny).pow(1 - alpha)
    s = torch.where((w_max > 0) & (x_max > 0), s, torch.ones_like(s))
    return s.clamp(min=SCALE_MIN)
