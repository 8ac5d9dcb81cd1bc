"""Each Triton kernel's time against its plain-torch reference, on a CUDA device.

- GPTQ's solve (the column loop, the factorization done once beforehand) of a 4096x4096 and
  an 8192x28672 layer (out x in), 4-bit group 128: `kernels.mode` torch against triton, and
  how many codes differ (float summation order may flip a rare code). Target: 5x.
- The pack-quantized W4A16 matmul (`kernels.w4a16.packed_linear`) at decode shapes, batch
  1..16, against an fp16 matmul with the dequantized weight (target: within 1.5x) and
  against the reference (dequantize, then matmul).
- AWQ's search on an 8B-shaped block (Llama-3-8B: hidden 4096, intermediate 14336): every
  candidate scale's error through the Gram matrix (`calib.awq_search.linear_losses`, the
  search's exact path) for the q/k/v, o, gate/up and down groups, torch against triton.
  Target: 2x.

Usage: python benchmarks/kernel_times.py [--repeat 5] [--gptq-repeat 2] [--grid 20]
Measured, never asserted. Without a CUDA device it says so and measures nothing: triton's
CPU interpreter is a correctness tool (tests/test_kernels.py), its times mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from shardquant.algorithms import awq
from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantSpec
from shardquant.kernels import select


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls after one warm-up (which also compiles), and the last result."""
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def in_mode(mode: str, fn: Callable[..., object], *args: object, **kwargs: object) -> Callable[[], object]:
    """``fn(*args, **kwargs)`` under kernel ``mode`` (arguments bound now)."""
    def run():
        with select.using(mode):
            return fn(*args, **kwargs)
    return run


def gptq_cases(repeat: int) -> None:
    print("## GPTQ solve (4-bit, group 128, symmetric; the factorization excluded)\n")
    print("| layer (out x in) | torch s | triton s | speed-up | codes differing |")
    print("| --- | --- | --- | --- | --- |")
    spec = QuantSpec(bits=4, group_size=128)
    for out_f, in_f in ((4096, 4096), (8192, 28672)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(2 * in_f, in_f, device="cuda", generator=g)
        solver = GPTQSolver(x.T @ x, overwrite_h=True)
        del x
        w = torch.randn(out_f, in_f, device="cuda", generator=g) * in_f**-0.5
        t_ref, ref = timed(in_mode("torch", solver.quantize, w, spec), repeat)
        t_k, got = timed(in_mode("triton", solver.quantize, w, spec), repeat)
        diff = int((ref.weight.codes != got.weight.codes).sum())
        print(f"| {out_f} x {in_f} | {t_ref:.3f} | {t_k:.3f} | {t_ref / t_k:.1f}x | {diff} of {w.numel()} |")
        solver = w = ref = got = None
        torch.cuda.empty_cache()
    print()


def w4a16_cases(repeat: int) -> None:
    from shardquant.algorithms.pack import pack
    from shardquant.kernels.w4a16 import dequantize_packed, packed_linear

    print("## W4A16 matmul (4-bit, group 128, asymmetric, fp16 activations)\n")
    print("| K x N | batch | fp16 matmul ms | kernel ms | kernel / fp16 | dequant+matmul ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096)):
        groups = k // 128
        codes = torch.randint(0, 16, (n, k), device="cuda")
        packed = pack(codes, 4)
        zp = pack(torch.randint(0, 16, (n, groups), device="cuda"), 4, dim=0)
        scale = (torch.rand(n, groups, device="cuda") * 0.01).half()
        w16 = dequantize_packed(packed, scale, zp, (n, k), group_size=128).half()
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_fp16, _ = timed(in_mode("torch", torch.nn.functional.linear, x, w16), repeat * 20)
            args = (x, packed, scale, zp, (n, k))
            t_k, _ = timed(in_mode("triton", packed_linear, *args, group_size=128), repeat * 20)
            t_ref, _ = timed(in_mode("torch", packed_linear, *args, group_size=128), repeat * 5)
            print(f"| {k} x {n} | {m} | {t_fp16 * 1e3:.3f} | {t_k * 1e3:.3f} | {t_k / t_fp16:.2f}x | "
                  f"{t_ref * 1e3:.3f} |")
    print()


def awq_cases(repeat: int, grid: int) -> None:
    print(f"## AWQ search on an 8B-shaped block ({grid} candidates, 4-bit group 128, asymmetric)\n")
    print("| group | weights | torch s | triton s | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    spec = QuantSpec(bits=4, group_size=128, symmetric=False)
    h, inter = 4096, 14336
    groups = {"q/k/v": (h, [4096, 1024, 1024]), "o": (h, [h]), "gate/up": (h, [inter, inter]), "down": (inter, [h])}
    from shardquant.calib.awq_search import linear_losses

    total = {"torch": 0.0, "triton": 0.0}
    for name, (in_f, outs) in groups.items():
        acc = HessianAccumulator(in_f, device="cuda")
        acc.add(torch.randn(2048, in_f, device="cuda"))
        weights = [torch.randn(o, in_f, device="cuda").half() * in_f**-0.5 for o in outs]
        cands = awq.candidate_scales(torch.rand(in_f, device="cuda") + 0.1, grid=grid)
        times = {}
        for mode in ("torch", "triton"):
            times[mode], _ = timed(in_mode(mode, linear_losses, acc, weights, cands, spec), repeat)
            total[mode] += times[mode]
        shapes = ", ".join(f"{o}x{in_f}" for o in outs)
        print(f"| {name} | {shapes} | {times['torch']:.3f} | {times['triton']:.3f} | "
              f"{times['torch'] / times['triton']:.1f}x |")
    print(f"| block | | {total['torch']:.3f} | {total['triton']:.3f} | {total['torch'] / total['triton']:.1f}x |\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gptq-repeat", type=int, default=2, help="the torch column loop takes many seconds a layer")
    ap.add_argument("--grid", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (the CPU interpreter's times are not kernel times)")
        return
    why = select.triton_error()
    if why is not None:
        print(f"triton does not import ({why}): nothing measured")
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    gptq_cases(args.gptq_repeat)
    w4a16_cases(args.repeat)
    awq_cases(args.repeat, args.grid)


if __name__ == "__main__":
    main()
