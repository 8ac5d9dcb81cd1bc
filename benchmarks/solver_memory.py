"""Peak memory of one GPTQ solve, in units of in² × 4 bytes (one in×in float32 matrix).

One linear (default in 8192, out 1024, 4-bit, group 128, act-order) whose Hessian is
accumulated from random activations with a few thousand rows (channels of uneven scale plus a
shared low-rank part, so H = X^T X is dense and ill-conditioned like real ones). Each mode
runs in a fresh process: once the accumulator is filled, the peak resident memory (VmHWM,
reset through /proc/self/clear_refs) is read while the solver is built from it and while it
quantizes, minus the resident memory before (which holds the accumulator and the weight).

Modes:
  hessian      ``GPTQSolver(acc.hessian())``: the call runner/execution/worker.py makes
               (the accumulator stays, H is a copy, the solver copies it again)
  accumulator  ``GPTQSolver.from_accumulator(acc)``: H is built in the accumulator's
               buffer and the solver factorizes in it (the accumulator is consumed)

``--rev REV`` adds the hessian mode with algorithms/ as it was at git revision REV (its files
copied into a temporary package), for a before/after in one invocation.

Usage: python benchmarks/solver_memory.py [--in 8192] [--out 1024] [--modes hessian accumulator]
       [--rev 890c421]
Measured, never asserted.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _algorithms_at(rev: str) -> str:
    """algorithms/ at git revision ``rev`` as an importable package; returns its name."""
    tmp = Path(tempfile.mkdtemp(prefix="solver_memory_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    pkg = tmp / "algorithms_at_rev"
    pkg.mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:algorithms"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:algorithms/{name}"],
                                  capture_output=True, text=True, check=True).stdout
            (pkg / name).write_text(text)
    sys.path.insert(0, str(tmp))
    return pkg.name


def _status(key: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(args: argparse.Namespace) -> dict[str, object]:
    """Fill an accumulator, then measure the solve of ``args.mode``; returns the numbers."""
    pkg = _algorithms_at(args.rev) if args.mode == "rev" else "shardquant.algorithms"
    GPTQSolver = importlib.import_module(f"{pkg}.gptq").GPTQSolver  # noqa: N806
    HessianAccumulator = importlib.import_module(f"{pkg}.hessian").HessianAccumulator  # noqa: N806
    QuantSpec = importlib.import_module(f"{pkg}.quantizer").QuantSpec  # noqa: N806
    n, rows = args.in_features, args.rows
    gen = torch.Generator().manual_seed(0)
    col_scale = torch.exp(torch.randn(n, generator=gen))  # channels of very different size
    mix = torch.randn(64, n, generator=gen) / 8
    acc = HessianAccumulator(n)
    for r0 in range(0, rows, 512):
        r = min(512, rows - r0)
        x = torch.randn(r, n, generator=gen) * col_scale + torch.randn(r, 64, generator=gen) @ mix
        acc.add(x)
    del x, mix, col_scale
    W = torch.randn(args.out_features, n, generator=gen)
    spec = QuantSpec(bits=args.bits, group_size=args.group, symmetric=True)
    gc.collect()
    unit = n * n * 4
    base = _status("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    if args.mode in ("hessian", "rev"):
        solver = GPTQSolver(acc.hessian(), damp=0.01, act_order=args.act_order)
    else:
        solver = GPTQSolver.from_accumulator(acc, damp=0.01, act_order=args.act_order)
    t1 = time.perf_counter()
    peak_build = _status("VmHWM")
    held = _status("VmRSS")
    res = solver.quantize(W, spec, block_size=128)
    t2 = time.perf_counter()
    peak = _status("VmHWM")
    return {
        "mode": args.mode,
        "peak_reset": exact,
        "build_peak": (peak_build - base) / unit,
        "held_after_build": (held - base) / unit,
        "solve_peak": (peak - base) / unit,
        "build_s": t1 - t0,
        "quantize_s": t2 - t1,
        "loss": res.loss,
        "codes_sum": int(res.weight.codes.long().sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="in_features", type=int, default=8192)
    p.add_argument("--out", dest="out_features", type=int, default=1024)
    p.add_argument("--rows", type=int, default=4096, help="calibration rows behind H")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--modes", nargs="+", default=["hessian", "accumulator"],
                   choices=["hessian", "accumulator"])
    p.add_argument("--rev", help="also measure the hessian mode with algorithms/ at this git revision")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # set in the child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    print(f"in {args.in_features}, out {args.out_features}, {args.rows} calibration rows, "
          f"{args.bits}-bit group {args.group}, act-order {args.act_order}; "
          f"unit = in² × 4 B = {args.in_features**2 * 4 / 2**20:.0f} MiB")
    print("| mode | build peak | held after build | solve peak | incl. accumulator | build s | quantize s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    checks = []
    modes = (["rev"] if args.rev else []) + args.modes
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        note = "" if r["peak_reset"] else " (VmHWM not reset: peaks are upper bounds)"
        label = f"hessian @{args.rev}" if mode == "rev" else mode
        print(f"| {label} | {r['build_peak']:.2f} | {r['held_after_build']:.2f} | {r['solve_peak']:.2f} "
              f"| {r['solve_peak'] + 1:.2f} | {r['build_s']:.1f} | {r['quantize_s']:.1f} |{note}")
        checks.append(f"{label}: loss {r['loss']:.6g}, sum of codes {r['codes_sum']}")
    print("\n".join(checks))


if __name__ == "__main__":
    main()
