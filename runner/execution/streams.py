"""A worker's activation streams and their passes through one block.

The streams of a share (`calib`, its fp-propagated `calib_next`, the quantized and fp
evaluation streams `eval_q` and `eval_fp`, the task sequences' `task_q` and `task_fp`) live in an `ActivationStore`; a pass replaces a
stream by its output after a block, batch by batch, with the block's finished stages taken
from a `StageCache` when there is one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from shardquant.calib.stage_cache import StageCache
from shardquant.execution.activations import ActivationStore
from shardquant.execution.packing import split_range
from shardquant.model.forward import BlockRunner, embed_batches
from shardquant.tasks.sequences import TaskSequences, embed_sequences


class Streams:
    """Passes of one store's streams through a block with one runner."""

    def __init__(self, store: ActivationStore, runner: BlockRunner):
        self.store, self.runner = store, runner

    def embed(
        self, emb: nn.Module, calib: Tensor | None, evals: Tensor | None, *, world: int, rank: int,
        calib_batch: int, eval_batch: int, fp_eval: bool, device: torch.device | str,
    ) -> tuple[int, Tensor | None]:
        """Embed share `rank` of `world` of the calibration and evaluation windows into the
        streams; its number of calibration windows and its evaluation tokens."""
        dev = device
        n_calib, eval_tokens = 0, None
        if calib is not None:
            a, b = split_range(len(calib), world, rank)
            n_calib = b - a
            self.store.put("calib", embed_batches(emb, calib[a:b], calib_batch, dev))
        if evals is not None:
            a, b = split_range(len(evals), world, rank)
            eval_tokens = evals[a:b]
            batches = embed_batches(emb, eval_tokens, eval_batch, dev)
            self.store.put("eval_q", batches)
            if fp_eval:
                self.store.put("eval_fp", [b.clone() for b in batches])
        return n_calib, eval_tokens

    def embed_tasks(
        self, emb: nn.Module, seqs: TaskSequences, *, world: int, rank: int, batch: int, fp: bool,
        device: torch.device | str,
    ) -> TaskSequences:
        """Share `rank` of `world` of the task sequences into `task_q` (and `task_fp`); the share."""
        a, b = split_range(len(seqs), world, rank)
        share = seqs.share(a, b)
        batches = embed_sequences(emb, share, batch, device)
        self.store.put("task_q", batches)
        if fp:
            self.store.put("task_fp", [t.clone() for t in batches])
        return share

    def _step(self, block: nn.Module, index: int) -> Callable[[Tensor], Tensor]:
        def step(h: Tensor) -> Tensor:
            return self.runner.forward(block, index, h)

        return step

    def through(self, stream: str, block: nn.Module, index: int, cache: StageCache | None = None) -> None:
        """Replace `stream` by its output after block `index`, batch by batch (the finished
        stages from `cache`, which records nothing: the stream is the calibration stream)."""
        if cache is None:
            self.store.map(stream, self._step(block, index))
            return
        with cache.active(self.store.count(stream), record=False):
            self.store.map(stream, cache.in_order(self._step(block, index)))

    def calib_fp(self, block: nn.Module, index: int) -> None:
        """`calib_next`: the calibration stream after the original block (`calib.propagate:
        fp`), kept apart until the block is done (`end_block` renames it)."""
        step = self._step(block, index)
        self.store.put("calib_next", (step(h) for h in self.store.iter("calib")))

    def observe_pass(
        self, block: nn.Module, index: int, cache: StageCache | None, *, stop_at: nn.Module | None = None,
        stop_after: nn.Module | None = None,
    ) -> list[Tensor]:
        """The calibration stream through block `index` up to `stop_at` or past `stop_after`
        (its outputs when run to the end), reusing (and recording) finished stages in `cache`;
        the stream is kept."""
        batches = self.store.iter("calib")
        stops = {"stop_at": stop_at, "stop_after": stop_after}
        if cache is None:
            return self.runner.forward_all(block, index, batches, **stops)
        with cache.active(self.store.count("calib")):
            return self.runner.forward_all(block, index, cache.batches(batches), **stops)
