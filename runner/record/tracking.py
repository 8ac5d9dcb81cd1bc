"""Run tracking: W&B when asked for, nothing otherwise.

The pipeline reports three things: the resolved config at the start, one record per finished
block, and the final report. `NullTracker` ignores them (the default: no import, no network);
`WandbTracker` logs them to a W&B run (`offline` writes only local files under the run
directory; `online` needs a network and fails fast with one clear line when there is none).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shardquant.config import WandbConfig
from shardquant.errors import UserError


class NullTracker:
    """Tracking switched off."""

    def start(self, config: dict[str, Any]) -> None:
        """Begin a run with the resolved config."""

    def log_block(self, block: dict[str, Any]) -> None:
        """One finished block (its report.json entry plus extras)."""

    def finish(self, report: dict[str, Any], files: list[Path]) -> None:
        """Final summary and artifacts."""


def block_metrics(block: dict[str, Any]) -> dict[str, Any]:
    """The flat W&B history row of one report.json block entry."""
    row: dict[str, Any] = {
        "block/index": block["index"],
        "block/seconds": block["seconds"],
        "block/worker": block["worker"],
        "block/activation_bytes": block.get("activation_bytes", 0),
    }
    for phase in ("forward_s", "stats_s", "solve_s"):
        if phase in block:
            row[f"block/{phase}"] = block[phase]
    for layer, loss in block["loss"].items():
        row[f"loss/{layer}"] = loss
    experts = block.get("experts")
    if experts:  # a sparse block: the tokens each expert received, the RTN fallbacks
        for e, n in enumerate(experts["tokens"]):
            row[f"experts/tokens/{e}"] = n
        row["experts/rtn_fallbacks"] = len(experts["rtn_fallback"])
    return row


def summary_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The W&B summary of a finished run (task scores as `tasks/<fp|quantized>/<task>/<metric>`)."""
    tasks = {
        f"tasks/{model}/{task}/{metric}": v
        for model, by_task in (report.get("eval", {}).get("tasks") or {}).items() if by_task
        for task, values in by_task.items() for metric, v in values.items()
    }
    return tasks | {
        "ppl/fp": report["ppl"]["fp"],
        "ppl/quantized": report["ppl"]["quantized"],
        "timing/total_s": report["timing"]["total_s"],
        "timing/calibrate_s": report["timing"]["calibrate_s"],
        "memory/peak_rss_bytes": report["memory"]["peak_rss_bytes"],
        "export/bytes": report["export"]["bytes"],
    }


class WandbTracker(NullTracker):
    """Logs to W&B; files land in `<output>/wandb/`."""

    def __init__(self, cfg: WandbConfig, output: Path, name: str | None = None):
        self.cfg = cfg
        self.output = output
        self.name = name
        self.run = None

    def start(self, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "tracking.wandb.mode: W&B is not installed; `pip install shardquant[wandb]` or set mode: disabled"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = wandb.Settings(init_timeout=25, silent=True, console="off")
        try:
            self.run = wandb.init(
                project=self.cfg.project, mode=self.cfg.mode, dir=str(self.output), config=config,
                name=self.name, settings=settings, reinit="finish_previous",
            )
        except Exception as e:  # wandb raises many types (CommError, UsageError, timeouts)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"tracking.wandb.mode={self.cfg.mode}: cannot start a W&B run ({first}); "
                "use mode: offline without a network"
            ) from None
        self.run.define_metric("block/index")
        self.run.define_metric("*", step_metric="block/index")

    def log_block(self, block: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(block_metrics(block))

    def finish(self, report: dict[str, Any], files: list[Path]) -> None:
        if self.run is None:
            return
        import wandb

        for k, v in summary_metrics(report).items():
            self.run.summary[k] = v
        artifact = wandb.Artifact(f"report-{self.run.id}", type="report")
        for f in files:
            if f.is_file():
                artifact.add_file(str(f))
        self.run.log_artifact(artifact)
        self.run.finish()
        self.run = None
        # finish() can return before the W&B service has flushed the run file; teardown waits,
        # so the offline files are complete when the run returns.
        wandb.teardown()


def make_tracker(cfg: WandbConfig, output: Path) -> NullTracker:
    """The tracker for `tracking.wandb`."""
    if cfg.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, output, name=output.name)
