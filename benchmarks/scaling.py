"""Calibration time against tokens and against depth: the fitted exponents (issue 9).

Usage: python benchmarks/scaling.py [--calib 16] [--layers 4]

Tokens: SmolLM2-135M, GPTQ w4 g64, with --calib, 2x and 4x calibration windows of 512
tokens; the exponent is the least-squares slope of log(calibrate_s) over log(tokens).
Depth: random Llama models of L and 2L blocks (benchmarks/memory_depth.py's shape), GPTQ
w4 g128, 16 x 256 tokens; the exponent is log2(t_2L / t_L). Target <= 1.05 each (the solve
does not grow with tokens, so the token exponent sits below 1). Every run in its own process,
in one invocation; measured, never asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from _common import ROOT, run_quantize, smollm2_protocol
from memory_depth import build, depth_config


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sq-scaling-"))
    tok_rows = []
    for k in (1, 2, 4):
        n = args.calib * k
        cfg = smollm2_protocol(calib_n=n, eval_n=1, seq_len=512)
        cfg["eval"]["enabled"] = False
        cfg["quant"] = {"method": "gptq", "bits": 4, "group_size": 64}
        cfg["output"] = str(work / f"tok-{n}")
        r = run_quantize(cfg, work / f"cfg-tok-{n}")
        tok_rows.append((n * 512, r["timing"]["calibrate_s"], r["timing"]))
        print(f"[tokens {n * 512}] calibrate {r['timing']['calibrate_s']:.1f} s", flush=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text

    text = work / "calib.txt"
    text.write_text(make_text(20000, 3))
    depth_rows = []
    for layers in (args.layers, 2 * args.layers):
        mdir = work / f"llama-{layers}"
        build(mdir, layers)
        r = run_quantize(depth_config(mdir, text, work / f"depth-{layers}"), work / f"cfg-depth-{layers}")
        depth_rows.append((layers, r["timing"]["calibrate_s"]))
        print(f"[blocks {layers}] calibrate {r['timing']['calibrate_s']:.1f} s", flush=True)
    print("\n| calibration tokens | calibrate_s | forward_s | stats_s | solve_s |\n| --- | --- | --- | --- | --- |")
    for n, t, timing in tok_rows:
        print(f"| {n} | {t:.1f} | {timing['forward_s']:.1f} | {timing['stats_s']:.1f} | {timing['solve_s']:.1f} |")
    e_tok = slope([n for n, _, _ in tok_rows], [t for _, t, _ in tok_rows])
    print(f"\ntoken exponent (log-log slope over 1x, 2x, 4x): {e_tok:.3f} (target <= 1.05)")
    print("\n| blocks | calibrate_s |\n| --- | --- |")
    for layers, t in depth_rows:
        print(f"| {layers} | {t:.1f} |")
    e_depth = math.log(depth_rows[1][1] / depth_rows[0][1]) / math.log(2)
    print(f"\ndepth exponent (log2 of t_2L / t_L): {e_depth:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
