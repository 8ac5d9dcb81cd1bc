"""A pipeline stage: one worker, every calibration window, a contiguous range of blocks.

With `calib.propagate: fp` the input of block i is the output of the original blocks < i, so
it does not depend on anything being quantized. The Ray run then splits the model instead of
the samples: stage k owns blocks [a_k, b_k) (`plan.split_range`). First the full-precision
streams pass through the stages in order (`stream`: one fp forward per block, the outputs
handed to the next stage through the object store, batch by batch); then every stage
calibrates its own blocks at the same time (`calibrate`, one call per block), each block on
all the samples, exactly as one process would. Evaluation through the quantized model runs
last, through the stages in order (`evaluate`), from the dequantized blocks the stages saved
in the run's state directory (so a resumed or recovered run has them too).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from shardquant.calib.steps import BlockProfile, calibrate_block
from shardquant.config import RunConfig
from shardquant.execution.local import LocalExecutor
from shardquant.execution.worker import BlockWorker
from shardquant.record.state import load_tensors, save_tensors
from shardquant.tools.plan import split_range


class StageWorker(BlockWorker):
    """Stage `stage` of `stages`; holds every window (the model is split, not the samples)."""

    def __init__(self, cfg: RunConfig | dict, stage: int = 0, stages: int = 1, *, name: str = "s0"):
        super().__init__(cfg, 0, 1, name=name)
        self.stage, self.stages = stage, stages
        a, b = split_range(self.source.num_blocks, stages, stage)
        self.range = range(a, b)
        self.steps = LocalExecutor(self.cfg, worker=self)
        self.eval_fp_out: list[Tensor] | None = None

    def block_range(self) -> tuple[int, int]:
        return self.range.start, self.range.stop

    def _through_original(self, stream: str, blocks: Iterable[int]) -> None:
        """Replace `stream` by its output after the original `blocks`, one block loaded at a time."""
        for i in blocks:
            block = self.source.block(i)
            self.store.map(stream, lambda h, block=block, i=i: self.runner.forward(block, i, h))
            self.source.release(block)

    def stream(self, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take the stage's fp input streams (the previous stage's `stream` result; stage 0:
        its own embedded windows), keep the calibration stream as the input of its first
        block, and return both streams after the stage's original blocks: the next stage's
        input."""
        if upstream is not None:
            self.store.put("calib", [t.clone() for t in upstream["calib"]])
            if upstream["eval_fp"] is not None:
                self.store.put("eval_fp", [t.clone() for t in upstream["eval_fp"]])
        if self.store.has("eval_q"):  # the quantized stream runs after calibration (`evaluate`)
            self.store.rename("eval_q", "eval_in")
        t = time.perf_counter()
        self.store.put("stream", [h.clone() for h in self.store.iter("calib")])
        self._through_original("stream", self.range)
        out_calib = list(self.store.iter("stream"))
        self.store.delete("stream")
        out_eval = None
        if self.store.has("eval_fp"):
            self._through_original("eval_fp", self.range)
            out_eval = list(self.store.iter("eval_fp"))
            self.store.delete("eval_fp")
            if self.stage == self.stages - 1:
                self.eval_fp_out = out_eval
        return {"calib": out_calib, "eval_fp": out_eval, "seconds": time.perf_counter() - t}

    def skip(self, index: int) -> None:
        """Block `index` was calibrated by an earlier run: only carry the fp stream past it."""
        self._through_original("calib", [index])

    def calibrate(self, index: int, block_file: str, qblock_file: str | None) -> dict[str, Any]:
        """Quantize block `index` on every window, write its exported tensors to
        `block_file` and (for `evaluate`) its dequantized weights to `qblock_file`; the result
        carries both files' sha256 as written (`block_sha256`, `qblock_sha256`: None without
        `qblock_file`)."""
        started = time.time()
        t0 = time.perf_counter()
        self.do_fp_eval = False
        self.begin_block(index)
        prof = BlockProfile()
        name = f"{self.adapter.blocks}.{index}"
        losses = calibrate_block(self.steps, name, self.source.skeleton.get_submodule(name), self.adapter,
                                 self.cfg.quant, prof)
        qdigest = None
        if qblock_file is not None:
            dequantized = {k: v.contiguous() for k, v in self.block.state_dict().items()}
            qdigest = save_tensors(Path(qblock_file), dequantized)
        part = self.end_block(block_file)
        digest = self.block_file_digest(block_file)
        return {"index": index, "seconds": time.perf_counter() - t0, "losses": losses, "profile": prof,
                "part": part, "start": started, "end": time.time(),
                "block_sha256": digest, "qblock_sha256": qdigest}

    def evaluate(self, qblock_files: dict[int, str], eval_q: list[Tensor] | None = None) -> list[Tensor] | int:
        """The evaluation stream through this stage's quantized blocks (stage 0: from its
        embedded windows), for the next stage; the last stage keeps it for `nll` and returns
        only its batch count."""
        if eval_q is not None:
            self.store.put("eval_q", [t.clone() for t in eval_q])
        elif self.store.has("eval_in"):
            self.store.rename("eval_in", "eval_q")
        for i in self.range:
            name = f"{self.adapter.blocks}.{i}"
            block = self.source.skeleton.get_submodule(name)
            block.load_state_dict(load_tensors(Path(qblock_files[i]), device=self.source.device), strict=True,
                                  assign=True)
            block.requires_grad_(False)
            self.store.map("eval_q", lambda h, block=block, i=i: self.runner.forward(block, i, h))
            self.source.release(block)
        if self.stage < self.stages - 1:
            return list(self.store.iter("eval_q"))
        if self.eval_fp_out is not None:
            self.store.put("eval_fp", self.eval_fp_out)
        return self.store.count("eval_q")

    def set_eval_tokens(self, evals: Tensor | None) -> None:
        """The evaluation windows' tokens (the last stage computes the perplexity)."""
        self.eval_tokens = evals
