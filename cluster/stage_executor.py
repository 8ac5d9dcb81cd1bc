"""Pipeline stages on Ray for `calib.propagate: fp` (see `shardquant.cluster.stage_worker`).

Each actor owns a contiguous range of blocks and every calibration window. The driver chains
the full-precision streams through the stages (object refs handed from stage to stage, never
fetched by the driver), then submits every stage's block calls at once: the stages calibrate
at the same time, and each finished block is recorded as it arrives, so an interrupted run
resumes by skipping the blocks already written (their fp inputs are recomputed, one forward
pass per block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardquant.cluster.ray_executor import RayExecutor
from shardquant.cluster.stage_worker import StageWorker
from shardquant.errors import UserError


class StageExecutor(RayExecutor):
    """Stage k of N on actor k; `run` calibrates every block, `nll` evaluates through the stages."""

    worker_cls = StageWorker
    staged = True

    def __init__(self, cfg, linear_shapes: dict[str, tuple[int, int]]):
        super().__init__(cfg, linear_shapes)
        self._qblock_files: dict[int, str] = {}  # what `run` wrote (and skipped blocks hold), for `nll`

    def setup(self, calib: torch.Tensor | None, evals: torch.Tensor | None, *, do_fp_eval: bool,
              tasks: Any = None) -> None:
        import ray

        if tasks is not None:
            raise UserError("eval.tasks: not computed by pipeline stages (calib.propagate: fp on Ray); "
                            "use calib.propagate: quantized, or `shardquant eval` on the exported checkpoint")
        self._setup_args = (ray.put(calib), ray.put(evals), do_fp_eval, None)
        ray.get([
            self.actors[0].setup.remote(self._setup_args[0], self._setup_args[1], do_fp_eval=do_fp_eval),
            self.actors[-1].set_eval_tokens.remote(self._setup_args[1]),
        ])

    def ranges(self) -> list[tuple[int, int]]:
        return self._all("block_range")

    def run(self, block_file: Callable[[int], str], qblock_file: Callable[[int], str] | None, skip: set[int],
            on_block: Callable[[dict[str, Any]], None]) -> float:
        """Stream the fp inputs through the stages, then calibrate every block not in `skip`
        (all stages at once), writing each block's exported tensors to `block_file(i)` and,
        when evaluating, its dequantized weights to `qblock_file(i)`; `on_block` gets each
        result as it finishes. Returns the seconds of the streaming pass."""
        import ray

        ranges = self.ranges()
        self._qblock_files = {} if qblock_file is None else {
            i: qblock_file(i) for a, b in ranges for i in range(a, b)
        }
        upstream = None
        streams = []
        for k, actor in enumerate(self.actors):
            upstream = actor.stream.remote(upstream) if k else actor.stream.remote()
            streams.append(upstream)
        pending = []
        for (a, b), actor in zip(ranges, self.actors, strict=True):
            for i in range(a, b):
                if i in skip:
                    actor.skip.remote(i)
                else:
                    pending.append(actor.calibrate.remote(i, block_file(i), self._qblock_files.get(i)))
        # On a lost actor the survivors' queued calls are left to finish rather than cancelled
        # (cancelling a running call interrupts it): they rewrite the same bytes atomically,
        # before the retry's calls, which queue behind them on the same actor.
        stream_s = sum(r["seconds"] for r in ray.get(streams))
        del streams, upstream
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_block(ray.get(done[0]))
        return stream_s

    def nll(self) -> list[dict[str, tuple[float, int]]]:
        """The quantized evaluation stream through every stage in order (the dequantized
        blocks that `run` wrote); the last computes the summed NLL of both streams."""
        import ray

        ref, files = None, self._qblock_files
        for k, actor in enumerate(self.actors):
            ref = actor.evaluate.remote(files, ref) if k else actor.evaluate.remote(files)
        ray.get(ref)  # the last stage answers with a count: the stream itself stays there
        return [ray.get(self.actors[-1].nll.remote())]
