"""Perplexity of RTN vs GPTQ on the real SmolLM2-135M (the foundation's protocol).

Calibration: 128 windows x 512 tokens of four Shakespeare plays; perplexity: 32 x 512 of a
disjoint play (Macbeth). Usage:

    python benchmarks/real_model.py [--grid core|full] [--calib 128] [--out DIR]

`core`: 3 and 4 bits, group 64, symmetric (RTN and GPTQ). `full`: 3/4 bits x groups 32, 64,
per-channel x symmetric/asymmetric. Prints a markdown table (ratios to fp side by side from
one run) and GPTQ's speed profile.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from _common import run_quantize, smollm2_protocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=["core", "full"], default="core")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-real-"))
    if args.grid == "core":
        grid = [(b, 64, True) for b in (4, 3)]
    else:
        grid = list(itertools.product((4, 3), (32, 64, -1), (True, False)))
    rows = []
    fp = None
    for bits, group, sym in grid:
        ppl = {}
        for method in ("rtn", "gptq"):
            cfg = smollm2_protocol(calib_n=args.calib)
            cfg["quant"] = {"method": method, "bits": bits, "group_size": group, "symmetric": sym}
            cfg["eval"]["fp"] = fp is None
            name = f"{method}-w{bits}g{group}{'s' if sym else 'a'}"
            cfg["output"] = str(out / name)
            r = run_quantize(cfg, out / f"cfg-{name}")
            fp = fp if fp is not None else r["ppl"]["fp"]
            ppl[method] = r["ppl"]["quantized"]
            if method == "gptq":
                t = r["timing"]
                nb = len(r["blocks"])
                print(f"[{name}] calibrate {t['calibrate_s']:.0f}s, {t['calibrate_s'] / nb:.1f}s/block, "
                      f"{r['calibration']['tokens'] * nb / t['calibrate_s']:.0f} token-blocks/s, "
                      f"forward {t['forward_s']:.0f}s stats {t['stats_s']:.0f}s solve {t['solve_s']:.0f}s, "
                      f"peak RSS {r['memory']['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        rows.append((bits, group, sym, ppl["rtn"], ppl["gptq"]))
        print(f"w{bits} g{group} {'sym' if sym else 'asym'}: rtn {ppl['rtn']:.3f} gptq {ppl['gptq']:.3f}", flush=True)
    print(f"\nfp perplexity: {fp:.3f}\n")
    print("| bits | group | scheme | RTN ppl | GPTQ ppl | RTN/fp | GPTQ/fp | GPTQ vs RTN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits, group, sym, rtn, gptq in rows:
        g = "per-channel" if group == -1 else str(group)
        print(f"| {bits} | {g} | {'sym' if sym else 'asym'} | {rtn:.3f} | {gptq:.3f} | {rtn / fp:.3f} | "
              f"{gptq / fp:.3f} | {gptq / rtn - 1:+.1%} |")


if __name__ == "__main__":
    main()
