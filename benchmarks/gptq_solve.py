"""Speed of GPTQ's column loop: the current solver against the previous one, side by side.

SmolLM2-135M-sized layers (576->576, 576->1536, 1536->576) with a random SPD Hessian,
4-bit group 64, symmetric and asymmetric. ``reference_quantize`` below is the solver's column
loop before it was vectorized (kept here, verbatim in behaviour, for this comparison). Each
case runs old and new alternately ``--repeat`` times and reports the median of each, the
ratio new/old, and how many codes differ (float summation order may flip a rare code).
Also times ``quantize_many`` on the q/k/v and gate/up stacks that share one Hessian.

Usage: python benchmarks/gptq_solve.py [--repeat 5] [--threads N]
Measured, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.quantizer import (
    QuantSpec,
    compute_qparams,
    group_qparams,
    quantize_codes,
)


def reference_quantize(
    solver: GPTQSolver, weight: Tensor, spec: QuantSpec, *, block_size: int = 128, static_groups: bool = False
) -> tuple[Tensor, Tensor, Tensor, float]:
    """The previous column loop (one column at a time, [out, 1] slices): codes, scales, zeros, loss."""
    n = solver.in_features
    W = weight.to(device=solver.hinv.device, dtype=solver.dtype, copy=True)
    W[:, solver.dead] = 0
    out_f = W.shape[0]
    glen, maxq = spec.group_len(n), spec.maxq
    dynamic = spec.group_size != -1 and not static_groups
    order = torch.arange(n, device=W.device) if solver.perm is None else solver.perm
    if dynamic:
        scales = W.new_empty(out_f, spec.n_groups(n), dtype=torch.float32)
        zeros = torch.empty_like(scales)
        g_idx = torch.arange(n, device=W.device) if solver.invperm is None else solver.invperm
        g_idx = g_idx // glen
    else:
        scales, zeros = group_qparams(W, spec)
        g_idx = torch.arange(n, device=W.device) // glen
    col_group = g_idx[order].tolist()
    if solver.perm is not None:
        W = W[:, solver.perm]
    U = solver.hinv
    codes = torch.empty(out_f, n, dtype=torch.int32, device=W.device)
    loss = W.new_zeros(())
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            g = col_group[c]
            if dynamic and c % glen == 0:
                end = min(c + glen, n)
                if end <= i2:
                    cur = W[:, c:end]
                else:
                    tail = W[:, i2:end] - err1[:, :i] @ U[i1:c, i2:end]
                    cur = torch.cat([W[:, c:i2], tail], dim=1)
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
    if solver.invperm is not None:
        codes = codes[:, solver.invperm]
    return codes, scales, zeros, loss.item()


def random_hessian(n: int, gen: torch.Generator) -> Tensor:
    """A correlated SPD Hessian 2 X^T X / rows with a few outlier channels."""
    mix = torch.randn(n, n, generator=gen) / n**0.5 + 0.3 * torch.eye(n)
    x = torch.randn(4 * n, n, generator=gen) @ mix
    x[:, :: max(1, n // 16)] *= 6
    return 2 * x.T @ x / x.shape[0]


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print("| layer (in->out) | scheme | old s | new s | new/old | codes differing | loss new/old |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    hess = {n: random_hessian(n, gen) for n in (576, 1536)}
    totals = [0.0, 0.0]
    for n_in, n_out in ((576, 576), (576, 1536), (1536, 576)):
        solver = GPTQSolver(hess[n_in], damp=0.01)
        W = torch.randn(n_out, n_in, generator=gen) * 0.02
        for sym in (True, False):
            spec = QuantSpec(bits=4, group_size=64, symmetric=sym)
            old_t, new_t = [], []
            for _ in range(args.repeat):
                t, ref = timed(lambda spec=spec, W=W, solver=solver: reference_quantize(solver, W, spec))
                old_t.append(t)
                t, res = timed(lambda spec=spec, W=W, solver=solver: solver.quantize(W, spec))
                new_t.append(t)
            old, new = statistics.median(old_t), statistics.median(new_t)
            totals[0] += old
            totals[1] += new
            diff = int((ref[0] != res.weight.codes).sum())
            print(f"| {n_in}->{n_out} | w4g64 {'sym' if sym else 'asym'} | {old:.3f} | {new:.3f} | "
                  f"{new / old:.2f} | {diff} of {ref[0].numel()} | {res.loss / ref[3]:.6f} |", flush=True)
    print(f"| all | | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] / totals[0]:.2f} | | |")

    # One block's shared-input stacks: q/k/v (576 -> 576 + 192 + 192), gate/up (576 -> 2 x 1536).
    print("\n| stack | separate quantize s | quantize_many s | many/separate |")
    print("| --- | --- | --- | --- |")
    spec = QuantSpec(bits=4, group_size=64, symmetric=True)
    solver = GPTQSolver(hess[576], damp=0.01)
    for name, outs in (("q/k/v", (576, 192, 192)), ("gate/up", (1536, 1536))):
        ws = [torch.randn(o, 576, generator=gen) * 0.02 for o in outs]
        sep_t, many_t = [], []
        for _ in range(args.repeat):
            sep_t.append(timed(lambda ws=ws: [solver.quantize(w, spec) for w in ws])[0])
            many_t.append(timed(lambda ws=ws: solver.quantize_many(ws, spec))[0])
        sep, many = statistics.median(sep_t), statistics.median(many_t)
        print(f"| {name} | {sep:.3f} | {many:.3f} | {many / sep:.2f} |", flush=True)


if __name__ == "__main__":
    main()
