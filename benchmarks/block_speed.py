"""Speed of the blockwise GPTQ loop on SmolLM2-135M: seconds per block, tokens/s, phase shares.

Usage: python benchmarks/block_speed.py [--calib N] [--seq-len T] [--set KEY=VALUE ...]
                                        [--compare KEY=VALUE ...] [--out DIR]

``--compare calib.reuse_stages=false`` runs that variant first, then the default, in one
invocation, and prints both columns and their ratio; ``--compare quant.method=awq`` puts
AWQ's calibration time (and its search share) beside GPTQ's. Measured, never asserted; paste the
table into benchmarks/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import apply_sets, run_quantize, smollm2_protocol


def measure(calib: int, seq_len: int, sets: list[str], out: Path) -> dict[str, float]:
    cfg = smollm2_protocol(calib_n=calib, eval_n=1, seq_len=seq_len)
    cfg["eval"]["enabled"] = False
    cfg["quant"] = {"method": "gptq", "bits": 4, "group_size": 64}
    apply_sets(cfg, sets)
    cfg["output"] = str(out / "run")
    r = run_quantize(cfg, out)
    t, blocks, tokens = r["timing"], r["blocks"], r["calibration"]["tokens"]
    busy = t["forward_s"] + t["stats_s"] + t["solve_s"] + t.get("search_s", 0.0)
    return {
        "seconds per block": sum(b["seconds"] for b in blocks) / len(blocks),
        "calibration tokens/s (tokens x blocks / calibrate_s)": tokens * len(blocks) / t["calibrate_s"],
        "calibrate_s": t["calibrate_s"],
        "forward_s": t["forward_s"],
        "stats_s": t["stats_s"],
        "solve_s": t["solve_s"],
        "search_s (AWQ)": t.get("search_s", 0.0),
        "share forward": t["forward_s"] / busy,
        "share stats": t["stats_s"] / busy,
        "share solve": t["solve_s"] / busy,
        "share search": t.get("search_s", 0.0) / busy,
        "peak RSS GiB": r["memory"]["peak_rss_bytes"] / 2**30,
    }


def _fmt(key: str, v: float) -> str:
    return f"{v:.1%}" if key.startswith("share") else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="also run this variant (repeatable overrides), before the default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-speed-"))
    runs = {}
    if args.compare:
        runs["variant (" + ", ".join(args.compare) + ")"] = measure(
            args.calib, args.seq_len, args.set + args.compare, out / "variant")
    runs["default" + (" (" + ", ".join(args.set) + ")" if args.set else "")] = measure(
        args.calib, args.seq_len, args.set, out / "default")
    print(f"calibration: {args.calib} x {args.seq_len} tokens, SmolLM2-135M, w4 g64 (GPTQ unless overridden)")
    names = list(runs)
    head = "| metric | " + " | ".join(names) + (" | default/variant |" if len(names) == 2 else " |")
    print(head)
    print("| --- " * (len(names) + 1 + (len(names) == 2)) + "|")
    for key in runs[names[0]]:
        cells = [_fmt(key, runs[n][key]) for n in names]
        if len(names) == 2:
            a, b = runs[names[0]][key], runs[names[1]][key]
            cells.append("" if key.startswith("share") or not a else f"{b / a:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
