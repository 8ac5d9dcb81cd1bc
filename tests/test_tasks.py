"""eval.tasks through lm-evaluation-harness, computed blockwise, against the harness's own HFLM."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import run_config
from task_fixtures import TASKS, assert_same_as_hflm

from shardquant.config import RunConfig
from shardquant.pipeline import quantize
from shardquant.record.tracking import summary_metrics


def task_cfg(model, texts, out, local_tasks, **kw) -> dict:
    return run_config(model, texts, out, quant={"method": "rtn", "bits": 4, "group_size": 32},
                      export={"format": "fake"}, eval={**TASKS, "task_paths": [str(local_tasks)]}, **kw)


def ours(report: dict, model: str) -> tuple[dict, dict]:
    """(metrics, samples) of one model ('fp' or 'quantized') from a run's report and samples file."""
    per_doc = json.loads(open(report["eval"]["task_samples"]).read())
    return report["eval"]["tasks"][model], per_doc[model]


@pytest.fixture(scope="module")
def local_task_run(tiny_models, texts, local_tasks, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tasks-local")
    cfg = task_cfg(tiny_models["llama"], texts, out, local_tasks)
    return quantize(RunConfig.model_validate(cfg), show_progress=False), out


def test_blockwise_tasks_equal_hflm_fp_and_quantized(local_task_run, tiny_models, hflm_reference):
    """fp streams equal HFLM on the original model, quantized streams HFLM on the fake export
    (the same dequantized weights): per request, per metric."""
    report, out = local_task_run
    assert_same_as_hflm(ours(report, "fp"), hflm_reference(tiny_models["llama"]))
    assert_same_as_hflm(ours(report, "quantized"), hflm_reference(out / "model"))
    assert report["eval"]["task_requests"] > report["eval"]["task_sequences"] * 0.5 > 0
    assert report["ppl"]["fp"] is not None  # perplexity windows stream beside the tasks


def test_task_scores_reach_report_md_and_wandb_summary(local_task_run):
    report, out = local_task_run
    md = (out / "report.md").read_text()
    acc = report["eval"]["tasks"]["quantized"]["tiny_mc"]["acc"]
    assert f"| tiny_mc | acc | {report['eval']['tasks']['fp']['tiny_mc']['acc']:.4f} | {acc:.4f} |" in md
    assert summary_metrics(report)["tasks/quantized/tiny_mc/acc"] == acc
    assert json.loads((out / "report.json").read_text())["eval"]["tasks"] == report["eval"]["tasks"]


def test_missing_task_folder_is_one_line_exit_2(tiny_models, texts, local_tasks, tmp_path, capsys):
    """(An unknown task name is refused the same way, after the harness indexed its own few
    hundred tasks: half a minute, so not run here.)"""
    from shardquant.cli import main

    cfg = task_cfg(tiny_models["llama"], texts, tmp_path / "out", local_tasks)
    cfg["eval"]["task_paths"] = [str(tmp_path / "missing")]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["quantize", str(tmp_path / "run.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shardquant: error: eval.task_paths: '{tmp_path / 'missing'}' does not exist"]
    assert not (tmp_path / "out").exists()
