"""Helpers shared by the benchmark scripts (not a test module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_quantize(cfg: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `shardquant quantize` in a fresh process (so peak RSS is its own) and return report.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "shardquant", "quantize", str(path), "--quiet"],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"shardquant failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(cfg["output"]) / "report.json").read_text())


def run_many(runs: list[tuple[dict[str, Any], Path]], jobs: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    """Run quantize configs, up to ``jobs`` processes at once; yield (index, report) as each ends.

    With ``jobs > 1`` each process gets an equal share of the CPU threads (OMP_NUM_THREADS), so
    only use it for quality grids: times measured side by side with other runs do not compare.
    """
    env = None
    if jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(run_quantize, cfg, workdir, env): i for i, (cfg, workdir) in enumerate(runs)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def apply_sets(cfg: dict[str, Any], sets: list[str]) -> None:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config dict."""
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        cfg.setdefault(section, {})[name] = yaml.safe_load(value)


def smollm2_protocol(calib_n: int = 128, eval_n: int = 32, seq_len: int = 512) -> dict[str, Any]:
    """The issue's real-model protocol: SmolLM2-135M, calibration plays vs. a disjoint eval play."""
    from shardquant.tools.assets import shakespeare_split, smollm2_dir

    calib, evaluation = shakespeare_split()
    return {
        "model": {"path": str(smollm2_dir())},
        "calib": {"path": str(calib), "n_samples": calib_n, "seq_len": seq_len, "batch_size": 8},
        "eval": {"path": str(evaluation), "n_samples": eval_n, "seq_len": seq_len, "batch_size": 4},
        "export": {},  # the defaults: one shard per block (export.shard_size: block)
    }
