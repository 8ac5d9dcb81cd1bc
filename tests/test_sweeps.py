"""W&B sweep files: the command a real W&B agent builds from them runs and the swept values land.

The agent is wandb's own `Agent._command_run` (what `wandb agent` calls for each run the sweep
controller hands out): it expands `${env}`, `${interpreter}`, `${args}` and starts the process.
Only the controller is played by the test: it picks one grid point. W&B runs offline.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_config

SWEEPS = Path(__file__).resolve().parent.parent / "cluster" / "sweeps"


def grid_points(sweep: dict) -> list[dict]:
    """Every parameter combination of a grid sweep, as the controller's `args` mapping."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [{n: {"value": v} for n, v in zip(names, combo, strict=True)} for combo in itertools.product(*choices)]


@pytest.mark.parametrize("name", ["grid.yaml", "gptq-bayes.yaml"])
def test_sweep_files_are_valid(name):
    sweep = yaml.safe_load((SWEEPS / name).read_text())
    assert sweep["metric"] == {"name": "ppl/quantized", "goal": "minimize"}
    from shardquant.config import RunConfig
    from shardquant.record.tracking import summary_metrics

    assert "ppl/quantized" in summary_metrics({"ppl": {"fp": 1.0, "quantized": 2.0}, "timing": {"total_s": 0, "calibrate_s": 0},
                                               "memory": {"peak_rss_bytes": 0}, "export": {"bytes": 0}})
    for key in sweep["parameters"]:  # every swept key is a config key
        section, field = key.split(".")
        assert field in RunConfig.model_fields[section].annotation.model_fields, key
    assert "${args}" in sweep["command"]


def test_agent_command_runs_a_grid_point(tiny_models, texts, tmp_path, monkeypatch):
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((SWEEPS / "grid.yaml").read_text())
    point = next(p for p in grid_points(sweep)
                 if p["quant.method"]["value"] == "gptq" and p["quant.bits"]["value"] == 8
                 and p["quant.group_size"]["value"] == 32)
    point["tracking.wandb.mode"] = {"value": "offline"}  # no W&B server here; a later --key wins
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["qwen2"], texts, tmp_path / "unused")))
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network call would fail fast
    monkeypatch.setenv("WANDB_SWEEP_ID", "sqsweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "")  # the agent sets these two: restored after the test
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # ${interpreter} = python
    monkeypatch.setenv("SHARDQUANT_CONFIG", str(cfg))
    monkeypatch.setenv("SHARDQUANT_SWEEP_DIR", str(tmp_path / "sweep"))

    agent = Agent(api=None, queue=None, sweep_id="sqsweep1")
    agent._sweep_command = sweep["command"]  # what Agent.run() reads from the sweep's config
    agent._command_run({"type": "run", "run_id": "run0001", "program": sweep.get("program"), "args": point})
    proc = agent._run_processes["run0001"]
    assert proc.wait() == 0

    out = tmp_path / "sweep" / "run0001"
    report = json.loads((out / "report.json").read_text())
    quant = report["config"]["quant"]
    assert (quant["method"], quant["bits"], quant["group_size"]) == ("gptq", 8, 32)
    assert report["config"]["output"] == str(out)
    assert report["ppl"]["quantized"] > 0
    assert (out / "model" / "model.safetensors.index.json").is_file()
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
