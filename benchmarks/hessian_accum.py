"""Hessian accumulation: the full X^T X product against the upper-triangle panels that
`HessianAccumulator` computes, on the input widths of SmolLM2-135M and Llama-70B-like layers.

Usage: python benchmarks/hessian_accum.py [--tokens 4096] [--repeat 5]
Both alternate in one run (median of --repeat); measured, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardquant.algorithms.hessian import HessianAccumulator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="rows per batch (8 windows x 512)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--widths", default="576,1536,4096,8192")
    args = ap.parse_args()
    print(f"{args.tokens} rows per add, torch threads {torch.get_num_threads()}")
    print("| in features | full addmm ms | panels ms | panels/full | max rel diff |")
    print("| --- | --- | --- | --- | --- |")
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d)
        full = torch.zeros(d, d)
        acc = HessianAccumulator(d)
        times = {"full": [], "panels": []}
        for _ in range(args.repeat + 1):
            t = time.perf_counter()
            full.addmm_(x.T, x)
            times["full"].append(time.perf_counter() - t)
            t = time.perf_counter()
            acc.add(x)
            times["panels"].append(time.perf_counter() - t)
        f, p = (statistics.median(times[k][1:]) for k in ("full", "panels"))
        diff = float(((acc.hessian() * acc.count / 2) - full).abs().max() / full.abs().max())
        print(f"| {d} | {f * 1e3:.1f} | {p * 1e3:.1f} | {p / f:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
