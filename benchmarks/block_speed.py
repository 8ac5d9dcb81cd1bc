"""Speed of the blockwise GPTQ loop on SmolLM2-135M: seconds per block, tokens/s, phase shares.

Usage: python benchmarks/block_speed.py [--calib N] [--seq-len T] [--out DIR]
Measured, never asserted. Prints one table; paste it into benchmarks/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import run_quantize, smollm2_protocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-speed-"))
    cfg = smollm2_protocol(calib_n=args.calib, eval_n=1, seq_len=args.seq_len)
    cfg["eval"]["enabled"] = False
    cfg["quant"] = {"method": "gptq", "bits": 4, "group_size": 64}
    cfg["output"] = str(out / "run")
    r = run_quantize(cfg, out)
    t = r["timing"]
    blocks = r["blocks"]
    tokens = r["calibration"]["tokens"]
    per_block = sum(b["seconds"] for b in blocks) / len(blocks)
    busy = t["forward_s"] + t["stats_s"] + t["solve_s"]
    print(f"calibration: {args.calib} x {args.seq_len} tokens, {len(blocks)} blocks")
    print("| metric | value |\n| --- | --- |")
    print(f"| seconds per block | {per_block:.2f} |")
    print(f"| calibration tokens/s (tokens x blocks / calibrate_s) | {tokens * len(blocks) / t['calibrate_s']:.0f} |")
    print(f"| calibrate_s | {t['calibrate_s']:.1f} |")
    for k in ("forward_s", "stats_s", "solve_s"):
        print(f"| share {k[:-2]} | {t[k] / busy:.1%} |")
    print(f"| peak RSS GiB | {r['memory']['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
