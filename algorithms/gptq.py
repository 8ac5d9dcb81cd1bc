"""GPTQ: column-by-column quantization with second-order error compensation.

Each column is rounded in turn and its error is spread over the not yet quantized columns
through the upper Cholesky factor of H^-1 (Frantar et al., 2022). Updates to columns beyond
the current block are applied lazily, once per block, as one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .quantizer import QuantizedWeight, QuantSpec, compute_qparams, group_qparams, quantize_codes

_DAMP_RETRIES = 4  # each retry multiplies the damping by 10


@dataclass
class GPTQResult:
    """A quantized weight and GPTQ's objective: sum of ((w - q) / d)^2 / 2 over all entries,
    d being the diagonal of the upper Cholesky factor of H^-1 at that column."""

    weight: QuantizedWeight
    loss: float


class GPTQSolver:
    """Factorizes one Hessian once so that all linears sharing that input reuse it.

    Handles dead columns (zero diagonal), the act-order permutation, damping and the upper
    Cholesky factor of the damped H^-1. Computes in float32, or in float64 when ``H`` is
    float64. If Cholesky fails, damping is raised tenfold up to a few times; the fraction
    finally used is ``self.damp``.
    """

    def __init__(self, H: Tensor, *, damp: float = 0.01, act_order: bool = False) -> None:
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
        if damp < 0:
            raise ValueError(f"damp must be >= 0, got {damp}")
        if not torch.isfinite(H).all():
            raise ValueError("H has non-finite entries")
        self.dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
        H = H.to(dtype=self.dtype, copy=True)
        self.dead = torch.diagonal(H) == 0
        H[self.dead, self.dead] = 1
        self.perm: Tensor | None = None
        self.invperm: Tensor | None = None
        if act_order:
            self.perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            self.invperm = torch.argsort(self.perm)
            H = H[self.perm][:, self.perm]
        self.hinv, self.damp = _damped_inverse_cholesky(H, damp)

    @property
    def in_features(self) -> int:
        """Number of input columns the Hessian describes."""
        return self.hinv.shape[0]

    def quantize(
        self,
        weight: Tensor,
        spec: QuantSpec,
        *,
        block_size: int = 128,
        static_groups: bool = False,
    ) -> GPTQResult:
        """Quantize ``weight`` [out, in]; codes and ``g_idx`` come back in original column order.

        Per-channel qparams, and with ``static_groups`` all group qparams, are computed from
        the original weight before any error update; otherwise a group's qparams come from
        its current (updated) weights when its first column, in processing order, is reached.
        """
        n = self.in_features
        if weight.dim() != 2 or weight.shape[1] != n:
            raise ValueError(f"weight must be [out, {n}], got shape {tuple(weight.shape)}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        W = weight.to(device=self.hinv.device, dtype=self.dtype, copy=True)
        W[:, self.dead] = 0
        out_f = W.shape[0]
        glen, maxq = spec.group_len(n), spec.maxq
        dynamic = spec.group_size != -1 and not static_groups

        order = torch.arange(n, device=W.device) if self.perm is None else self.perm
        if dynamic:
            scales = W.new_empty(out_f, spec.n_groups(n), dtype=torch.float32)
            zeros = torch.empty_like(scales)
            g_idx = torch.arange(n, device=W.device) if self.invperm is None else self.invperm
            g_idx = g_idx // glen
        else:
            scales, zeros = group_qparams(W, spec)
            g_idx = torch.arange(n, device=W.device) // glen
        col_group = g_idx[order].tolist()  # group of each column in processing order
        if self.perm is not None:
            W = W[:, self.perm]

        U = self.hinv
        codes = torch.empty(out_f, n, dtype=torch.int32, device=W.device)
        loss = W.new_zeros(())
        for i1 in range(0, n, block_size):
            i2 = min(i1 + block_size, n)
            W1 = W[:, i1:i2]  # a view: in-block updates land in W directly
            U1 = U[i1:i2, i1:i2]
            err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                c = i1 + i
                g = col_group[c]
                if dynamic and c % glen == 0:
                    cur = _current_columns(W, err1, U, i1, i2, i, min(c + glen, n))
                    s, z = compute_qparams(cur, spec)
                    scales[:, g : g + 1], zeros[:, g : g + 1] = s, z
                else:
                    s, z = scales[:, g : g + 1], zeros[:, g : g + 1]
                w = W1[:, i : i + 1]
                code = quantize_codes(w, s, z, maxq)
                codes[:, c : c + 1] = code
                err = (w - (code.to(W.dtype) - z) * s) / U1[i, i]
                err1[:, i : i + 1] = err
                W1[:, i + 1 :] -= err @ U1[i : i + 1, i + 1 :]
            W[:, i2:] -= err1 @ U[i1:i2, i2:]
            loss += err1.square().sum() / 2

        if self.invperm is not None:
            codes = codes[:, self.invperm]
        qweight = QuantizedWeight(
            codes=codes.contiguous(),
            scales=scales,
            zeros=zeros.to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            spec=spec,
        )
        return GPTQResult(weight=qweight, loss=loss.item())


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """One-shot GPTQ of one weight; computes in float64 if ``weight`` or ``H`` is float64."""
    if weight.dtype == torch.float64:
        H = H.to(torch.float64)
    solver = GPTQSolver(H, damp=damp, act_order=act_order)
    return solver.quantize(weight, spec, block_size=block_size, static_groups=static_groups)


def _damped_inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp on failure."""
    mean_diag = torch.diagonal(H).mean()
    tried = []
    for attempt in range(_DAMP_RETRIES + 1):
        frac = damp if attempt == 0 else max(damp, 1e-3) * 10**attempt
        tried.append(frac)
        Hd = H.clone()
        torch.diagonal(Hd).add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info.item() == 0 and torch.isfinite(U).all():
            return U, frac
    raise ValueError(
        f"Hessian is not positive definite even with damping fractions {tried}; "
        "the calibration activations are degenerate (too few tokens or NaNs upstream?)"
    )


def _current_columns(
    W: Tensor, err1: Tensor, U: Tensor, i1: int, i2: int, i: int, end: int
) -> Tensor:
    """Current weights of processing columns [i1 + i, end), adding the pending block updates
    that columns past the block (>= i2) have not received yet."""
    c = i1 + i
    if end <= i2:
        return W[:, c:end]
    tail = W[:, i2:end] - err1[:, :i] @ U[i1:c, i2:end]
    return torch.cat([W[:, c:i2], tail], dim=1)
