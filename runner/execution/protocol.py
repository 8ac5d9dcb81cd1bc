"""The executor protocol: what the pipeline and the block loop ask of any executor.

An executor runs the steps of a run on its workers and hands back reduced results. Two
kinds exist: data parallel (every worker holds a share of the samples and the same block;
`staged` False: the block loop calls `begin_block`, the `BlockSteps` of
`calib.steps.calibrate_block`, `end_block` and the checkpoint steps), and pipeline stages
(`staged` True: every worker owns a range of blocks and all the samples; the block loop
calls `run` once). `execution.local.LocalExecutor` is the in-process one;
`shardquant.cluster` holds the Ray ones. The pipeline never imports those: the caller
passes an `ExecutorFactory` (the CLI picks `shardquant.cluster.make_executor` for Ray).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from shardquant.calib.steps import BlockSteps
from shardquant.config import RunConfig
from shardquant.model.source import ModelSource

BlockResult = dict[str, Any]


@runtime_checkable
class Executor(BlockSteps, Protocol):
    """The lifecycle of a run on some workers, plus the per-block steps (`BlockSteps`)."""

    names: list[str]  # one per worker, for report.json
    staged: bool  # True: pipeline stages, driven by `run`; False: data parallel steps

    @property
    def world(self) -> int: ...

    def setup(self, calib: torch.Tensor | None, evals: torch.Tensor | None, *, do_fp_eval: bool) -> None:
        """Embed each worker's windows (its share, or all of them for stages). With eval.tasks
        the pipeline also passes `tasks=` (`tasks.sequences.TaskSequences`): each worker embeds
        its share, streams it like the evaluation windows, and `task_scores` answers."""

    def begin_block(self, index: int) -> None:
        """Load block `index` on every worker and run the fp streams through it."""

    def end_block(self, block_file: str) -> list[BlockResult]:
        """Propagate, evaluate, start writing the block's tensors to `block_file` (one worker,
        in the background) and free it; per-worker records."""

    def block_file_digest(self, block_file: str) -> str:
        """Wait for the write of `block_file` that `end_block` started; its sha256."""

    def begin_save_activations(self, paths: list[str]) -> None:
        """Start writing each worker's streams to its path (in the background)."""

    def end_save_activations(self) -> list[str | None]:
        """Wait for those writes; their sha256s in worker order."""

    def load_activations(self, paths: list[str]) -> None:
        """Replace each worker's streams with a saved checkpoint."""

    def run(self, block_file: Callable[[int], str], qblock_file: Callable[[int], str] | None, skip: set[int],
            on_block: Callable[[BlockResult], None]) -> float:
        """Stages only: calibrate every block not in `skip`; returns the fp streaming seconds."""

    def nll(self) -> list[dict[str, tuple[float, int]]]:
        """Per worker: summed NLL and token count of each evaluation stream."""

    def task_scores(self) -> list[dict[str, list[tuple[float, bool]]]]:
        """Per worker, in sequence-share order: (logprob, greedy) of each task sequence, per
        stream (`task_q`, `task_fp`); asked only when `setup` got tasks."""

    def assemble(self, jobs: list[tuple[str, list, list[str | None]]]) -> dict[str, str]:
        """Write the planned shards from the block state files (None: a tensor outside the
        blocks, read from the source); their sha256 by path."""

    def peak_rss(self) -> list[int]:
        """Each worker's peak resident memory."""

    def recover(self, error: BaseException) -> bool:
        """Replace lost workers after `error`; True when the work can be redone."""

    def close(self) -> None:
        """Release the workers."""


ExecutorFactory = Callable[[RunConfig, ModelSource], Executor]
