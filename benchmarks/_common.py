"""Helpers shared by the benchmark scripts (not a test module)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_quantize(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run `shardquant quantize` in a fresh process (so peak RSS is its own) and return report.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "shardquant", "quantize", str(path), "--quiet"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"shardquant failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(cfg["output"]) / "report.json").read_text())


def smollm2_protocol(calib_n: int = 128, eval_n: int = 32, seq_len: int = 512) -> dict[str, Any]:
    """The issue's real-model protocol: SmolLM2-135M, calibration plays vs. a disjoint eval play."""
    sys.path.insert(0, str(ROOT))
    from shardquant.assets import shakespeare_split, smollm2_dir

    calib, evaluation = shakespeare_split()
    return {
        "model": {"path": str(smollm2_dir())},
        "calib": {"path": str(calib), "n_samples": calib_n, "seq_len": seq_len, "batch_size": 8},
        "eval": {"path": str(evaluation), "n_samples": eval_n, "seq_len": seq_len, "batch_size": 4},
        "export": {"shard_size": "500MB"},
    }
