"""Speed of the CPU simulation of NVFP4's 4-bit inputs at several row-chunk sizes.

One `calib.inputs.fake_quantize_input` of a float32 [8, 512, K] batch (SmolLM2-135M's input
widths K = 576 and 1536) with a static input global scale, taken whole and in chunks of
2^17 to 2^21 elements (`calib.inputs._FP4_CHUNK`); the best of three rounds of ten calls.
Every size gives the same bits (tests/test_kernels.py), so only the time is printed.

Usage: python benchmarks/fp4_inputs.py
Measured, never asserted.
"""

from __future__ import annotations

import time

import torch

from shardquant.calib import inputs
from shardquant.config import QuantConfig

WHOLE = 1 << 40  # a chunk larger than any batch: the tensor in one piece


def main() -> None:
    args = inputs.input_args(QuantConfig(scheme="NVFP4", method="rtn"))
    chunks = (WHOLE, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21)
    default = inputs._FP4_CHUNK
    print(f"shipped chunk: {default} elements")
    for k in (576, 1536):
        x = torch.randn(8, 512, k)
        params = inputs.static_params(args, x.abs().amax(), x.dtype)
        best: dict[int, float] = {}
        for _ in range(3):
            for chunk in chunks:
                inputs._FP4_CHUNK = chunk
                inputs.fake_quantize_input(x, args, params)
                t = time.perf_counter()
                for _ in range(10):
                    inputs.fake_quantize_input(x, args, params)
                ms = (time.perf_counter() - t) / 10 * 1e3
                best[chunk] = min(best.get(chunk, ms), ms)
        inputs._FP4_CHUNK = default
        row = ", ".join(f"{'whole' if c == WHOLE else c}: {ms:.1f} ms" for c, ms in best.items())
        print(f"K={k}: {row}")


if __name__ == "__main__":
    main()
