"""Quality options on SmolLM2-135M: GPTQ's damping, reordering, range update, MSE range search;
AWQ's scale-search sample.

Each setting is one `shardquant quantize` process (64 x 512 calibration windows of the four
calibration plays, perplexity on 32 x 512 of Macbeth, as benchmarks/peers.py). Usage:

    python benchmarks/ablation.py [--schemes sym,asym] [--only NAME,...] [--calib 64]
                                  [--set KEY=VALUE] [--jobs N] [--out DIR]

Settings (name: quant overrides) are listed in SETTINGS below: damping (`damp`), group-aware
reordering (`reorder: group`), act-order with static groups (llm-compressor's `actorder:
static`), group ranges from the block-start weights (`group_range: block_start`, as
AutoGPTQ/GPTQModel), the MSE range search (`mse`) and, for AWQ, how many windows the scale
search runs attention and the MLP on (`awq_search_samples`). Measured, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SETTINGS: dict[str, dict[str, object]] = {
    "base": {"damp": 0.01, "reorder": "none"},
    "d05": {"damp": 0.05, "reorder": "none"},
    "d05-gar": {"damp": 0.05, "reorder": "group"},
    "d05-gar-bs": {"damp": 0.05, "reorder": "group", "group_range": "block_start"},
    "d05-gar-mse": {"damp": 0.05, "reorder": "group", "mse": True},
    "d01-gar": {"damp": 0.01, "reorder": "group"},
    "d05-mse": {"damp": 0.05, "reorder": "none", "mse": True},
    "d01-act-static": {"damp": 0.01, "reorder": "none", "act_order": True, "static_groups": True},
    "d05-act-static": {"damp": 0.05, "reorder": "none", "act_order": True, "static_groups": True},
    "d01-act-static-mse": {"damp": 0.01, "reorder": "none", "act_order": True, "static_groups": True, "mse": True},
    # AWQ (scales, clip search, RTN): the scale search's window sample for attention and MLP.
    "awq-all": {"method": "awq", "awq_search_samples": None},
    "awq-s16": {"method": "awq", "awq_search_samples": 16},
    "awq-s8": {"method": "awq", "awq_search_samples": 8},
    "awq-s4": {"method": "awq", "awq_search_samples": 4},
    "awq-lin": {"method": "awq", "awq_search_objective": "linears"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="sym")
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable), e.g. model.device=cuda")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once after the first (quality only: times then do not compare)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from _common import apply_sets, run_many, smollm2_protocol

    out = Path(args.out or tempfile.mkdtemp(prefix="sq-ablation-"))
    runs, keys = [], []
    for sname in args.schemes.split(","):
        for name in args.only.split(","):
            quant = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": sname == "sym", **SETTINGS[name]}
            if quant["method"] != "gptq":
                quant = {k: v for k, v in quant.items() if k not in ("damp", "reorder")}
            cfg = smollm2_protocol(calib_n=args.calib, eval_n=args.eval)
            cfg["quant"] = quant
            cfg["export"]["format"] = "fake"
            cfg["eval"]["fp"] = not runs
            apply_sets(cfg, args.set)
            tag = f"w4g64{sname}-{name}"
            cfg["output"] = str(out / tag)
            runs.append((cfg, out / f"cfg-{tag}"))
            keys.append((sname, name, tag))
    reports: dict[int, dict] = {}
    for offset, batch, jobs in ((0, runs[:1], 1), (1, runs[1:], args.jobs)):
        for i, r in run_many(batch, jobs):
            reports[offset + i] = r
            t = r["timing"]
            print(f"[{keys[offset + i][2]}] ppl {r['ppl']['quantized']:.3f}, calibrate {t['calibrate_s']:.0f} s, "
                  f"solve {t.get('solve_s', float('nan')):.0f} s, search {t.get('search_s', 0.0):.0f} s", flush=True)
    fp = reports[0]["ppl"]["fp"]
    rows = [
        (sname, name, reports[i]["ppl"]["quantized"], reports[i]["timing"]["calibrate_s"],
         reports[i]["timing"].get("solve_s", float("nan")), reports[i]["timing"].get("search_s", 0.0))
        for i, (sname, name, _) in enumerate(keys)
    ]
    print(f"\nfp perplexity: {fp:.3f}\n")
    print("| scheme | setting | overrides | ppl | ppl/fp | calibrate s | solve s | search s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sname, name, ppl, cal, solve, search in rows:
        ov = ", ".join(f"{k}={v}" for k, v in SETTINGS[name].items())
        print(f"| w4g64 {sname} | {name} | {ov} | {ppl:.3f} | {ppl / fp:.4f} | {cal:.0f} | {solve:.0f} | {search:.0f} |")


if __name__ == "__main__":
    main()
