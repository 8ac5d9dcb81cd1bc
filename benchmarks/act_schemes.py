"""Weight-activation schemes on the real SmolLM2-135M (issue 19): perplexity, calibration seconds
and checkpoint size per scheme, all exported as compressed-tensors.

    python benchmarks/act_schemes.py [--calib 16] [--eval 16] [--seq 256] [--only NAME,...]
                                     [--set KEY=VALUE] [--jobs N] [--out DIR]

Rows: W4A16 GPTQ (group 64: SmolLM2's 576 inputs are no multiple of 128) as the reference,
W8A8 RTN, W8A8 SmoothQuant (alpha 0.5) + GPTQ, FP8_DYNAMIC GPTQ, NVFP4 RTN / GPTQ, MXFP4
RTN / GPTQ; and FP8_BLOCK on down_proj alone beside FP8_DYNAMIC on down_proj alone (the other
linears' 576 inputs are no multiple of the 128-column blocks, which FP8_BLOCK's per-128-column
input groups need). FP8_BLOCK RTN / GPTQ on the whole model run on SmolLM2 widened with zeros
to 128-multiple sizes, the same function (`widen_model.py`; `--set model.path=...`). The perplexity is with every quantized linear's input quantized as the
scheme says (what the served model computes). Runs one at a time unless `--jobs`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import apply_sets, run_many, smollm2_protocol

ONLY_DOWN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
RUNS = {  # name: quant section
    "W4A16 GPTQ": {"method": "gptq", "scheme": "W4A16", "group_size": 64},
    "W8A8 RTN": {"method": "rtn", "scheme": "W8A8"},
    "W8A8 SmoothQuant+GPTQ": {"method": "gptq", "scheme": "W8A8", "smoothquant": 0.5},
    "FP8_DYNAMIC GPTQ": {"method": "gptq", "scheme": "FP8_DYNAMIC"},
    # FP8_BLOCK needs 128-multiple inputs: of SmolLM2's linears only down_proj (1536 inputs) has
    # them, so the block row quantizes down_proj alone, beside FP8_DYNAMIC on the same linears
    "FP8_BLOCK GPTQ down_proj": {"method": "gptq", "scheme": "FP8_BLOCK", "ignore": ["lm_head", *ONLY_DOWN]},
    "FP8_DYNAMIC GPTQ down_proj": {"method": "gptq", "scheme": "FP8_DYNAMIC", "ignore": ["lm_head", *ONLY_DOWN]},
    # the whole model: only on SmolLM2 widened to 128-multiple sizes (widen_model.py)
    "FP8_BLOCK RTN": {"method": "rtn", "scheme": "FP8_BLOCK"},
    "FP8_BLOCK GPTQ": {"method": "gptq", "scheme": "FP8_BLOCK"},
    "NVFP4 RTN": {"method": "rtn", "scheme": "NVFP4"},
    "NVFP4 GPTQ": {"method": "gptq", "scheme": "NVFP4"},
    "MXFP4 RTN": {"method": "rtn", "scheme": "MXFP4"},
    "MXFP4 GPTQ": {"method": "gptq", "scheme": "MXFP4"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default="", help="comma-separated row names to run alone")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (the seconds then do not compare across machines' loads)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-act-"))
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    runs = []
    for k, name in enumerate(names):
        cfg = smollm2_protocol(calib_n=args.calib, eval_n=args.eval, seq_len=args.seq)
        cfg["quant"] = dict(RUNS[name])
        cfg["eval"]["fp"] = k == 0
        apply_sets(cfg, args.set)
        slug = name.lower().replace(" ", "-").replace("+", "-")
        cfg["output"] = str(out / slug)
        runs.append((cfg, out / f"cfg-{slug}"))
    rows = {}
    fp = None
    for i, r in run_many(runs, args.jobs):
        name = names[i]
        fp = fp or r["ppl"]["fp"]
        rows[name] = (r["ppl"]["quantized"], r["timing"]["calibrate_s"], r["export"]["bytes"])
        print(f"[{name}] ppl {rows[name][0]:.3f}, calibrate {rows[name][1]:.0f}s, {rows[name][2] / 1e6:.1f} MB",
              flush=True)
    if fp is None:
        print("(no fp perplexity: pass the W4A16 GPTQ row, which evaluates fp, too)")
        fp = float("nan")
    print("\n| scheme | perplexity | / fp | calibration s | checkpoint MB |\n| --- | --- | --- | --- | --- |")
    print(f"| fp | {fp:.3f} | 1.000 | | |")
    for name in names:
        ppl, secs, size = rows[name]
        print(f"| {name} | {ppl:.3f} | {ppl / fp:.3f} | {secs:.0f} | {size / 1e6:.1f} |")


if __name__ == "__main__":
    main()
