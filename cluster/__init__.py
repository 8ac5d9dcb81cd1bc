"""Ray executors (data parallel actors, pipeline stages) and launch recipes (Slurm, ray job, W&B sweeps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardquant.config import RunConfig
    from shardquant.execution.protocol import Executor
    from shardquant.model.source import ModelSource


def make_executor(cfg: RunConfig, source: ModelSource) -> Executor:
    """The executor of `cluster.backend: ray` (an `ExecutorFactory`, registered as the `ray`
    entry point of `shardquant.executors`): Ray actors, data parallel, or pipeline stages with
    `calib.propagate: fp`; `cluster.backend: local` gets the in-process one. Ray is imported
    only when one is built."""
    if cfg.cluster.backend == "local":
        from shardquant.execution.local import local_executor

        return local_executor(cfg, source)
    if cfg.calib.propagate == "fp" and cfg.quant.method != "none":
        from shardquant.cluster.stage_executor import StageExecutor

        return StageExecutor(cfg, source.linear_shapes())
    from shardquant.cluster.ray_executor import RayExecutor

    return RayExecutor(cfg, source.linear_shapes())
