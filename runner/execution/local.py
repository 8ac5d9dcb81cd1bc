"""The in-process executor (see `execution.protocol.Executor`).

`LocalExecutor` has one in-process `BlockWorker` that holds every sample;
`shardquant.cluster.ray_executor.RayExecutor` has N Ray actors of the same class, with the
calibration samples split between them (data parallel), statistics reduced as exact
(sum, count) pairs, and each linear solved on one of them.
"""

from __future__ import annotations

from typing import Any

import torch

from shardquant.calib.steps import GroupStats, SolveTask
from shardquant.config import RunConfig
from shardquant.execution.worker import BlockWorker
from shardquant.model.source import ModelSource
from shardquant.tasks.sequences import TaskSequences


class LocalExecutor:
    """Every step on one in-process worker that holds all the samples."""

    staged = False

    def __init__(self, cfg: RunConfig, worker: BlockWorker | None = None):
        self.worker = worker or BlockWorker(cfg, 0, 1, name="local")
        self.names = ["local"]
        self._stats: dict[str, GroupStats] = {}
        self._pending: dict = {}

    @property
    def world(self) -> int:
        return 1

    # --- run lifecycle --------------------------------------------------------------------

    def setup(self, calib: torch.Tensor | None, evals: torch.Tensor | None, *, do_fp_eval: bool,
              tasks: TaskSequences | None = None) -> None:
        self.worker.setup(calib, evals, do_fp_eval=do_fp_eval, tasks=tasks)

    def begin_block(self, index: int) -> None:
        self.worker.begin_block(index)

    def end_block(self, block_file: str) -> list[dict[str, Any]]:
        """Per-worker block records (one here), like every executor."""
        return [self.worker.end_block(block_file)]

    def block_file_digest(self, block_file: str) -> str:
        return self.worker.block_file_digest(block_file)

    def begin_save_activations(self, paths: list[str]) -> None:
        self.worker.begin_save_activations(paths[0])

    def end_save_activations(self) -> list[str | None]:
        return [self.worker.end_save_activations()]

    def load_activations(self, paths: list[str]) -> None:
        self.worker.load_activations(paths[0])

    def nll(self) -> list[dict[str, tuple[float, int]]]:
        return [self.worker.nll()]

    def task_scores(self) -> list[dict[str, list[tuple[float, bool]]]]:
        return [self.worker.task_scores()]

    def assemble(self, jobs: list[tuple[str, list, list[str | None]]]) -> dict[str, str]:
        return self.worker.assemble(jobs)

    def peak_rss(self) -> list[int]:
        return [self.worker.peak_rss()]

    def recover(self, error: BaseException) -> bool:
        """A local failure is not recoverable in-process."""
        return False

    def close(self) -> None:
        self.worker.close()

    # --- block steps (see calibrate.BlockSteps) --------------------------------------------

    def observe(self, groups, *, channel, capture):
        self._stats = {}  # the last pass's statistics go before this pass accumulates its own
        self._stats = self.worker.observe(groups, channel=channel, capture=capture)
        # An expert no token reached has no mean (it falls back to RTN: steps._expert_fallbacks).
        return {g: st.channel.mean() for g, st in self._stats.items() if st.channel is not None and st.channel.count}

    def awq_losses(self, group, linears, quantized, consumer, x_mean):
        totals, count = self.worker.awq_losses(group, linears, quantized, consumer, x_mean)
        return [t / count for t in totals]

    def fold(self, group, choice, prev, linears):
        self.worker.fold(group, choice, prev, linears)

    def sample_rows(self, group, n):
        return self.worker.sample_rows(group, n)

    def solve(self, tasks: list[SolveTask]) -> dict[str, float]:
        weights, losses = self.worker.solve(tasks, self._stats)
        self._pending = weights
        return losses

    def apply(self) -> None:
        self.worker.apply(self._pending)
        self._pending = {}

    def expert_tokens(self) -> dict[str, Any]:
        return self.worker.expert_tokens()

    def input_extremes(self) -> dict[str, torch.Tensor]:
        return self.worker.input_extremes()

    def calibrate_inputs(self, plan) -> None:
        self.worker.calibrate_inputs(plan)

    def end_group(self, group: str) -> None:
        self.worker.end_group(group)
        self._stats.pop(group, None)


def local_executor(cfg: RunConfig, source: ModelSource) -> LocalExecutor:
    """The executor of `cluster.backend: local` (an `ExecutorFactory`)."""
    return LocalExecutor(cfg)
