"""The benchmark matrix on the real SmolLM2-135M through `shardquant grid` (12 cells, see
benchmarks/matrix.yaml), then `shardquant compare` over the cells. Usage:

    python benchmarks/matrix.py [--out runs/matrix] [--calib 128] [--eval-n 32] [--seq-len 512]
                                [--no-task] [--set KEY=VALUE] [--write-only]

Writes <out>/base.yaml (the real-model protocol of benchmarks/real_model.py, export fake) and
<out>/grid.yaml, then runs the grid (a rerun skips finished cells). Unless --no-task, every cell
also runs the held-out multiple-choice task of benchmarks/next_line.py (<out>/tasks/, 100 lines
of Twelfth Night, each against three distractors from the same play) through eval.tasks. --write-only stops after
writing them (run `shardquant grid <out>/grid.yaml` yourself, e.g. in a Slurm job).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml
from _common import ROOT, apply_sets, smollm2_protocol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/matrix")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval-n", type=int, default=32, help="perplexity windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and perplexity window")
    ap.add_argument("--no-task", action="store_true", help="perplexity only (no next_line task)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every cell (repeatable), e.g. model.device=cuda")
    ap.add_argument("--write-only", action="store_true", help="write base.yaml and grid.yaml, run nothing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = smollm2_protocol(calib_n=args.calib, eval_n=args.eval_n, seq_len=args.seq_len)
    base["export"]["format"] = "fake"
    if not args.no_task:
        from next_line import build

        tasks = build(out / "tasks", "twelfth_night_gut.txt", 100, 0)
        base["eval"].update({"tasks": ["next_line"], "task_paths": [str(tasks.resolve())]})
    apply_sets(base, args.set)
    (out / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    grid = yaml.safe_load((ROOT / "benchmarks" / "matrix.yaml").read_text())
    grid["base"], grid["output"] = "base.yaml", str(out.resolve())
    (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    print(f"written: {out / 'base.yaml'}, {out / 'grid.yaml'}")
    if not args.write_only:
        sys.exit(subprocess.call([sys.executable, "-m", "shardquant", "grid", str(out / "grid.yaml")]))


if __name__ == "__main__":
    main()
