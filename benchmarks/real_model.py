"""Perplexity of RTN, GPTQ, AWQ and AWQ+GPTQ on the real SmolLM2-135M (the foundation's protocol).

Calibration: 128 windows x 512 tokens of four Shakespeare plays; perplexity: 32 x 512 of a
disjoint play (Macbeth). Usage:

    python benchmarks/real_model.py [--grid core|full] [--awq] [--calib 128] [--set KEY=VALUE]
                                    [--jobs N] [--only NAME,...] [--out DIR]

`core`: 3 and 4 bits, group 64, symmetric (RTN and GPTQ). `full`: 3/4 bits x groups 32, 64,
per-channel x symmetric/asymmetric, the group-64 symmetric rows first. `--awq` adds AWQ and
AWQ+GPTQ to the group-64 symmetric rows. Prints one line per run as it finishes (perplexity,
calibration seconds and GPTQ's speed profile), then a markdown table (ratios to fp side by
side from one run) and the calibration time of every method.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from _common import apply_sets, run_many, smollm2_protocol

LABEL = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "awq+gptq": "AWQ+GPTQ"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=["core", "full"], default="core")
    ap.add_argument("--awq", action="store_true", help="also awq and awq+gptq on the group-64 symmetric rows")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable), e.g. model.device=cuda")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once after the first (quality only: times then do not compare)")
    ap.add_argument("--only", default="", help="comma-separated run names (e.g. gptq-w3g-1s) to run alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-real-"))
    first = [(4, 64, True), (3, 64, True)]
    grid = first if args.grid == "core" else first + [
        g for g in itertools.product((4, 3), (32, 64, -1), (True, False)) if g not in first
    ]
    runs, keys = [], []
    for bits, group, sym in grid:
        methods = ["rtn", "gptq"] + (["awq", "awq+gptq"] if args.awq and group == 64 and sym else [])
        for method in methods:
            name = f"{method}-w{bits}g{group}{'s' if sym else 'a'}"
            if args.only and name not in args.only.split(","):
                continue
            cfg = smollm2_protocol(calib_n=args.calib)
            cfg["quant"] = {"method": method, "bits": bits, "group_size": group, "symmetric": sym}
            cfg["eval"]["fp"] = not runs
            if bits == 3:
                cfg["export"]["format"] = "fake"  # compressed-tensors holds 2, 4 and 8 bits
            apply_sets(cfg, args.set)
            cfg["output"] = str(out / name)
            runs.append((cfg, out / f"cfg-{name}"))
            keys.append((bits, group, sym, method, name))
    # The first run alone (it also evaluates fp), then the rest, `--jobs` at a time.
    reports: dict[int, dict] = {}
    for offset, batch, jobs in ((0, runs[:1], 1), (1, runs[1:], args.jobs)):
        for i, r in run_many(batch, jobs):
            reports[offset + i] = r
            name = keys[offset + i][-1]
            t = r["timing"]
            nb = len(r["blocks"])
            print(f"[{name}] ppl {r['ppl']['quantized']:.3f}; calibrate {t['calibrate_s']:.0f}s, "
                  f"{t['calibrate_s'] / nb:.1f}s/block, "
                  f"{r['calibration']['tokens'] * nb / t['calibrate_s']:.0f} token-blocks/s, "
                  f"forward {t['forward_s']:.0f}s stats {t['stats_s']:.0f}s solve {t['solve_s']:.0f}s "
                  f"search {t.get('search_s', 0):.0f}s, peak RSS {r['memory']['peak_rss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
            if offset == 0:
                print(f"[fp] ppl {r['ppl']['fp']:.3f}", flush=True)
    fp = reports[0]["ppl"]["fp"]
    rows: list[tuple[int, int, bool, dict[str, float]]] = []
    seconds: dict[str, list[float]] = {}
    for i, (bits, group, sym, method, _) in enumerate(keys):
        if not rows or rows[-1][:3] != (bits, group, sym):
            rows.append((bits, group, sym, {}))
        rows[-1][3][method] = reports[i]["ppl"]["quantized"]
        seconds.setdefault(method, []).append(reports[i]["timing"]["calibrate_s"])
    print(f"\nfp perplexity: {fp:.3f}\n")
    used = [m for m in LABEL if any(m in p for *_, p in rows)]
    print("| bits | group | scheme | " + " | ".join(f"{LABEL[m]} ppl" for m in used) + " | "
          + " | ".join(f"{LABEL[m]}/fp" for m in used) + " | GPTQ vs RTN |")
    print("| --- " * (3 + 2 * len(used) + 1) + "|")
    for bits, group, sym, ppl in rows:
        g = "per-channel" if group == -1 else str(group)
        vals = " | ".join(f"{ppl[m]:.3f}" if m in ppl else "—" for m in used)
        ratios = " | ".join(f"{ppl[m] / fp:.3f}" if m in ppl else "—" for m in used)
        vs = f"{ppl['gptq'] / ppl['rtn'] - 1:+.1%}" if {"gptq", "rtn"} <= ppl.keys() else "—"
        print(f"| {bits} | {g} | {'sym' if sym else 'asym'} | {vals} | {ratios} | "
              f"{vs} |")
    print("\n| method | runs | mean calibrate_s |\n| --- | --- | --- |")
    for m in used:
        print(f"| {LABEL[m]} | {len(seconds[m])} | {sum(seconds[m]) / len(seconds[m]):.0f} |")


if __name__ == "__main__":
    main()
