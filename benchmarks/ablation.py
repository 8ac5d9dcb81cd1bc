"""GPTQ quality options on SmolLM2-135M: damping, reordering, range update, MSE range search.

Each setting is one `shardquant quantize` process (64 x 512 calibration windows of the four
calibration plays, perplexity on 32 x 512 of Macbeth, as benchmarks/peers.py). Usage:

    python benchmarks/ablation.py [--schemes sym,asym] [--only NAME,...] [--calib 64] [--out DIR]

Settings (name: quant overrides) are listed in SETTINGS below: damping (`damp`), group-aware
reordering (`reorder: group`), act-order with static groups (llm-compressor's `actorder:
static`), group ranges from the block-start weights (`group_range: block_start`, as
AutoGPTQ/GPTQModel) and the MSE range search (`mse`). Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
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
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="sym")
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import subprocess

    import yaml
    from _common import smollm2_protocol

    out = Path(args.out or tempfile.mkdtemp(prefix="sq-ablation-"))
    rows, fp = [], None
    for sname in args.schemes.split(","):
        for name in args.only.split(","):
            quant = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": sname == "sym", **SETTINGS[name]}
            cfg = smollm2_protocol(calib_n=args.calib, eval_n=args.eval)
            cfg["quant"] = quant
            cfg["export"]["format"] = "fake"
            cfg["eval"]["fp"] = fp is None
            tag = f"w4g64{sname}-{name}"
            cfg["output"] = str(out / tag)
            (out / f"{tag}.yaml").parent.mkdir(parents=True, exist_ok=True)
            (out / f"{tag}.yaml").write_text(yaml.safe_dump(cfg))
            proc = subprocess.run(
                [sys.executable, "-m", "shardquant", "quantize", str(out / f"{tag}.yaml"), "--quiet"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{tag} failed:\n{proc.stderr[-3000:]}")
            r = json.loads((out / tag / "report.json").read_text())
            fp = fp if fp is not None else r["ppl"]["fp"]
            ppl, t = r["ppl"]["quantized"], r["timing"]
            rows.append((sname, name, ppl, t["calibrate_s"], t.get("solve_s", float("nan"))))
            print(f"[{tag}] ppl {ppl:.3f} ({ppl / fp:.4f}x fp), calibrate {t['calibrate_s']:.0f} s, "
                  f"solve {t.get('solve_s', float('nan')):.0f} s", flush=True)
    print(f"\nfp perplexity: {fp:.3f}\n")
    print("| scheme | setting | overrides | ppl | ppl/fp | calibrate s | solve s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for sname, name, ppl, cal, solve in rows:
        ov = ", ".join(f"{k}={v}" for k, v in SETTINGS[name].items())
        print(f"| w4g64 {sname} | {name} | {ov} | {ppl:.3f} | {ppl / fp:.4f} | {cal:.0f} | {solve:.0f} |")


if __name__ == "__main__":
    main()
