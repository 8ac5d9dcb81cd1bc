"""GPTQ quality options on SmolLM2-135M: damping, group-aware reordering, MSE range search.

Each setting is one `shardquant quantize` process (64 x 512 calibration windows of the four
calibration plays, perplexity on 32 x 512 of Macbeth, as benchmarks/peers.py). Usage:

    python benchmarks/ablation.py [--schemes sym,asym] [--only NAME,...] [--calib 64] [--out DIR]

Settings (name: overrides): base: damp 0.01; d05: damp 0.05; d05-gar: + reorder group;
d05-gar-mse: + mse; d01-gar: damp 0.01 + reorder group; d05-mse: damp 0.05 + mse.

The options are passed as config keys (`quant.reorder`, `quant.mse`, ...). Until the runner
passes them to the solver, this script's child process also sets them as the solver's
defaults (`--cli` mode below), so the measurement does not depend on that wiring; explicit
arguments from the runner win. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

SETTINGS: dict[str, dict[str, object]] = {
    "base": {"damp": 0.01, "reorder": "none"},
    "d05": {"damp": 0.05, "reorder": "none"},
    "d05-gar": {"damp": 0.05, "reorder": "group"},
    "d05-gar-mse": {"damp": 0.05, "reorder": "group", "mse": True},
    "d01-gar": {"damp": 0.01, "reorder": "group"},
    "d05-mse": {"damp": 0.05, "reorder": "none", "mse": True},
}


def _cli_with_solver_defaults(argv: list[str]) -> int:
    """Run the shardquant CLI with quant.reorder / quant.mse* (from SQ_SOLVER_OPTS) as the
    GPTQ solver's defaults, for runners that do not pass them yet."""
    from shardquant.algorithms import gptq
    from shardquant.algorithms.quantizer import MSEGrid
    from shardquant.cli import main as cli_main

    opts = json.loads(os.environ.get("SQ_SOLVER_OPTS", "{}"))
    mse = MSEGrid(opts.get("mse_grid", 100), opts.get("mse_max_shrink", 0.2), opts.get("mse_norm", 2.4)) if opts.get("mse") else None
    cls = gptq.GPTQSolver
    init, quantize, many = cls.__init__, cls.quantize, cls.quantize_many

    def patched_init(self, H, **kw):
        if opts.get("reorder", "none") != "none" and not kw.get("act_order"):
            kw.setdefault("reorder", opts["reorder"])
            kw.setdefault("group_size", opts["group_size"])
        init(self, H, **kw)

    def patched_quantize(self, weight, spec, **kw):
        if kw.get("mse") is None:
            kw["mse"] = mse
        return quantize(self, weight, spec, **kw)

    def patched_many(self, weights, spec, **kw):
        if kw.get("mse") is None:
            kw["mse"] = mse
        return many(self, weights, spec, **kw)

    cls.__init__, cls.quantize, cls.quantize_many = patched_init, patched_quantize, patched_many
    return cli_main(argv)


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
            env = {**os.environ, "SQ_SOLVER_OPTS": json.dumps({**quant, "group_size": 64})}
            proc = subprocess.run(
                [sys.executable, __file__, "--cli", "quantize", str(out / f"{tag}.yaml"), "--quiet"],
                env=env, capture_output=True, text=True,
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
    if len(sys.argv) > 1 and sys.argv[1] == "--cli":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        sys.exit(_cli_with_solver_defaults(sys.argv[2:]))
    main()
