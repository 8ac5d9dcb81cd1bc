"""One process's share of a blockwise run.

A `BlockWorker` owns a contiguous share of the calibration and evaluation windows (their
activations, kept in an `ActivationStore`) and, one at a time, a materialized block. The
driver (`calib.steps.calibrate_block`, `execution.block_loop`) calls its steps in order:
`begin_block`, then per observation phase `observe` (statistics as exact (sum, count)
accumulators, reduced by the executor), the AWQ steps, `solve` on the worker that owns a
linear, `apply` everywhere, and `end_block` (propagate, evaluate, write the block's tensors).

The local executor runs one worker in-process; the Ray executor wraps the same class in
actors, so both go through exactly this code. The worker holds the state; the work is done
by `calib.observe` (statistics hooks), `calib.awq_search` (AWQ's candidate losses and clip
rows), `calib.solvers` (one solver per method), `execution.streams` (the streams' passes
through a block) and `execution.checkpoints` (the activation checkpoint).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.algorithms.smoothquant import (
    channel_absmax,
    smooth_scales,
    smooth_statistic,
    weight_column_max,
)
from shardquant.calib import awq_search
from shardquant.calib.inputs import InputQuantizers, input_args, static_params
from shardquant.calib.observe import Capture, observing
from shardquant.calib.solvers import solve_task
from shardquant.calib.stage_cache import StageCache
from shardquant.calib.steps import (
    BlockProfile,
    GroupStats,
    LayerResult,
    RowSlice,
    SolveTask,
    fold_scales,
    join_row_slices,
    merge_stats,
    observes_inputs,
    quant_spec,
)
from shardquant.checkout import drop_checkouts
from shardquant.config import RunConfig
from shardquant.execution.activations import ActivationStore
from shardquant.execution.checkpoints import ActivationCheckpointer, BlockFileWriter
from shardquant.execution.memory import trim_heap
from shardquant.execution.streams import Streams
from shardquant.export.registry import get_exporter
from shardquant.kernels import select
from shardquant.model.experts import PerExpert, block_experts
from shardquant.model.forward import BlockRunner, stream_nll
from shardquant.model.source import ModelSource
from shardquant.record.report import peak_rss_bytes
from shardquant.record.state import assemble_shard
from shardquant.tasks.sequences import TaskSequences, score_sequences
from shardquant.tools.plan import activation_cap


class BlockWorker:
    """A share of the samples, the current block, and the steps that work on them."""

    def __init__(self, cfg: RunConfig | dict, rank: int = 0, world: int = 1, *, name: str = "local"):
        drop_checkouts()  # a Ray worker's path holds the driver's working directory: maybe a checkout
        self.cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg)
        self.rank, self.world, self.name = rank, world, name
        c = self.cfg
        select.set_mode(c.kernels.mode)  # this process's kernels (a Ray worker is a process of its own)
        self.source = ModelSource(
            c.model.path, dtype=c.model.dtype, device=c.model.device, trust_remote_code=c.model.trust_remote_code
        )
        self.adapter = self.source.adapter
        self.exporter = get_exporter(c.export.format, self.source, c.quant)
        self.runner = BlockRunner(self.adapter, self.source.skeleton.config, self.source.rotary())
        self.spec = quant_spec(c.quant, self.source.dtype)
        budget = activation_cap(c)
        self.store = ActivationStore(budget, c.cluster.spill_dir, tag=f"{name}", spill=c.cluster.spill)
        self.streams = Streams(self.store, self.runner)
        self.block: nn.Module | None = None
        self.experts: PerExpert | None = None
        self.index = -1
        self.results: dict[str, LayerResult] = {}
        self.captures: dict[str, Capture] = {}
        self.checkpoints = ActivationCheckpointer(self.store)
        self.block_files = BlockFileWriter()
        self.originals: dict[str, Tensor] = {}
        self.candidates: dict[str, list[Tensor]] = {}
        self.scales: dict[str, Tensor] = {}
        self.profile = BlockProfile()
        self.stage_cache: StageCache | None = None
        self.groups = {g.name: g for g in self.adapter.groups}  # the current block's (begin_block)
        self.eval_tokens: Tensor | None = None
        self.task_share: TaskSequences | None = None
        self.do_fp_eval = False
        self.inputs = InputQuantizers(input_args(c.quant))  # the quantized linears' input quantization
        self.observe_inputs = observes_inputs(c.quant)
        self.last_extremes: dict[str, Tensor] = {}

    # --- samples -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Who and where this worker is (also a liveness probe: `RayExecutor.recover`)."""
        return {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.source.device)}

    def setup(self, calib: Tensor | None, evals: Tensor | None, *, do_fp_eval: bool,
              tasks: TaskSequences | None = None) -> int:
        """Embed this worker's share of the calibration and evaluation windows (and of the
        eval.tasks sequences); return its number of calibration windows."""
        emb = self.source.load(self.adapter.embed)
        n_calib, self.eval_tokens = self.streams.embed(
            emb, calib, evals, world=self.world, rank=self.rank, calib_batch=self.cfg.calib.batch_size,
            eval_batch=self.cfg.eval.batch_size, fp_eval=do_fp_eval, device=self.source.device,
        )
        self.task_share = None
        if tasks is not None:
            self.task_share = self.streams.embed_tasks(
                emb, tasks, world=self.world, rank=self.rank, batch=self.cfg.eval.batch_size, fp=do_fp_eval,
                device=self.source.device,
            )
        self.do_fp_eval = do_fp_eval
        self.source.release(emb)
        return n_calib

    # --- one block -----------------------------------------------------------------------

    def begin_block(self, index: int) -> None:
        """Load block `index`; run the fp evaluation stream (and the fp calibration stream
        when propagating fp) through the original weights."""
        self.profile = BlockProfile()
        t = time.perf_counter()
        self.block = self.source.block(index)
        self.index = index
        self.experts = block_experts(self.block, self.adapter)
        scale_only = self.adapter.scale_groups(0 if self.experts is None else len(self.experts))
        self.groups = {g.name: g for g in (*self.source.block_groups(index), *scale_only)}
        self.profile.extra["load_s"] = time.perf_counter() - t
        self.results, self.captures, self.originals, self.candidates, self.scales = {}, {}, {}, {}, {}
        self.inputs.clear()
        self.last_extremes = {}
        self.stage_cache = None
        if self.cfg.calib.reuse_stages and self.cfg.quant.true_sequential:
            self.stage_cache = StageCache.for_block(self.block, self.adapter, index, self.cfg.quant)
        t = time.perf_counter()
        for stream in ("eval_fp", "task_fp"):
            if self.do_fp_eval and self.store.has(stream):
                self.streams.through(stream, self.block, index)
        self.profile.extra["eval_s"] = time.perf_counter() - t
        if self.cfg.calib.propagate == "fp" and self.store.has("calib"):
            t = time.perf_counter()
            self.streams.calib_fp(self.block, index)
            self.profile.forward_s += time.perf_counter() - t

    def _lin(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def observe(
        self, groups: list[tuple[str, str]], *, channel: bool, capture: dict[str, str | None]
    ) -> dict[str, GroupStats]:
        """Run the calibration share through the block up to the last group's input and
        accumulate each group's statistics (`calib.observe.observing`: `groups` is
        [(group name, first linear)], `capture` maps a group to its consumer for AWQ)."""
        last = self.groups[groups[-1][0]]
        stop = {"stop_after": self.block.get_submodule(last.stop_after)} if last.stop_after else \
            {"stop_at": self._lin(groups[-1][1])}
        moe = self.experts is not None and any(self.groups[g].stop_after for g, _ in groups)
        if moe:
            self.experts.reset_counts()
            self.experts.counting = True
            self.experts.observe_all = self.cfg.quant.moe_calibrate_all_experts
            chosen = {self.groups[g].expert for g, _ in groups} - {None}
            self.experts.active = frozenset(chosen) if len(chosen) < len(self.experts) else None
        try:
            with observing(self.block, groups, channel=channel, capture=capture,
                           hessian=self.cfg.quant.method != "rtn", absmax=self.observe_inputs) as obs:
                self.captures.update(obs.captures)
                t = time.perf_counter()
                self.streams.observe_pass(self.block, self.index, self.stage_cache, **stop)
        finally:
            if moe:
                self.experts.counting = self.experts.observe_all = False
                self.experts.active = None
        if self.stage_cache is not None:
            last, first = groups[-1]
            self.stage_cache.offer_tail(first, self.groups[last].linears, obs.last_inputs)
        self.profile.forward_s += time.perf_counter() - t - obs.stats_s
        self.profile.stats_s += obs.stats_s
        self.last_extremes = {g: st.absmax.signed for g, st in obs.stats.items() if st.absmax is not None}
        return obs.stats

    def input_extremes(self) -> dict[str, Tensor]:
        """This worker's `ChannelMax.signed` (max x, max -x per input channel) of each group of
        the last observation: reduced over workers by max, exactly."""
        return self.last_extremes

    def calibrate_inputs(
        self, plan: dict[str, tuple[Tensor | None, str, tuple[str, ...], tuple[str, ...], bool]]
    ) -> None:
        """For each group (`ChannelMax.signed` over all workers, prev, linears, quantized,
        smooth): fold SmoothQuant's scales (`smooth`, from `quant.smoothquant_stat`; every
        worker computes the same ones from the same weights) and set the static input
        parameters of its quantized linears from the absmax of the input they will see
        (``x / s`` when smoothed)."""
        from shardquant.model.adapters import InputGroup

        q = self.cfg.quant
        for group, (signed, prev, linears, quantized, smooth) in plan.items():
            if signed is None:  # no rows reached this group (an expert no token chose)
                signed = torch.full((2, self._lin(linears[0]).in_features), -torch.inf)
            signed = signed.to(self._lin(linears[0]).weight.device)
            amax = channel_absmax(signed)
            if smooth:
                x_stat = smooth_statistic(signed, q.smoothquant_stat)
                s = smooth_scales(x_stat, weight_column_max([self._lin(n).weight for n in linears]), q.smoothquant)
                self.scales[group] = s  # GPTQ solves from the Hessian of x / s (`solvers.factorize`)
                fold_scales(self.block, InputGroup(group, prev, linears), s, self.results)
                if self.stage_cache is not None:
                    self.stage_cache.invalidate(prev, linears)
                amax = amax / s
            if self.inputs.args is not None:
                params = static_params(self.inputs.args, amax, self.source.dtype)
                for name in quantized:
                    self.inputs.params[name] = params

    def expert_tokens(self) -> dict[str, Any]:
        """This worker's routing in the last pass that observed experts: tokens routed to
        each expert and tokens seen (`PerExpert` counts); empty for a dense block."""
        if self.experts is None:
            return {}
        return {"routed": self.experts.routed.tolist(), "rows": self.experts.rows}

    def observe_parts(
        self, groups: list[tuple[str, str]], *, channel: bool, capture: dict[str, str | None]
    ) -> tuple[dict[str, GroupStats], dict[str, tuple[Tensor, int]]]:
        """`observe`, plus each group's channel (sum, count) apart: the small part a driver
        fetches (for AWQ) while the Hessians go straight to the workers that solve."""
        stats = self.observe(groups, channel=channel, capture=capture)
        return stats, {g: (st.channel.sum, st.channel.count) for g, st in stats.items() if st.channel is not None}

    # --- AWQ -----------------------------------------------------------------------------

    def awq_losses(
        self,
        group: str,
        linears: tuple[str, ...],
        quantized: tuple[str, ...],
        consumer: str,
        x_mean: Tensor,
        offset: int = 0,
        total: int | None = None,
    ) -> tuple[list[float], int]:
        """Summed squared error of the consumer's output for each candidate scale, and the
        element count, over this worker's part of the sample (`awq_search.search_losses`;
        this worker's windows are [offset, offset + own) of `total`). The candidates and the
        unscaled weights are kept for `fold` and `solve`."""
        t = time.perf_counter()
        found = awq_search.search_losses(
            self.block, self.captures[group], linears, quantized, consumer, x_mean,
            self.cfg.quant, self.spec, offset, total,
        )
        self.originals.update(found.originals)
        self.candidates[group] = found.candidates
        # This worker's own Hessian part served the search; the solve reads the reduced sum
        # (in one process the same object), so the capture lets go of it.
        self.captures[group].hessian = None
        self.profile.extra["search_s"] = self.profile.extra.get("search_s", 0.0) + time.perf_counter() - t
        return found.totals, found.count

    def fold(self, group: str, choice: int | None, prev: str, linears: tuple[str, ...]) -> None:
        """Apply candidate `choice` of the last search (None: leave unscaled) to the group."""
        from shardquant.model.adapters import InputGroup

        if choice is None:
            self.candidates.pop(group, None)
            return
        s = self.candidates.pop(group)[choice].to(self._lin(linears[0]).weight.device)
        self.scales[group] = s
        fold_scales(self.block, InputGroup(group, prev, linears), s, self.results)
        # Groups whose every linear took these scales from the same op read x / s as well
        # (each expert's gate/up under the sparse block's shared-input scale): those observed
        # in this pass (their captures are here) scale their Hessians and clip rows by them; a
        # later pass (`quant.moe_experts_per_pass`) observes the folded input itself.
        for name, g in self.groups.items():
            if name != group and name in self.captures and g.prev == prev and set(g.linears) <= set(linears):
                self.scales[name] = s
        # Dropped, not rescaled: results must be bit-identical with and without the cache, and
        # no rescaling of kept tensors gives the bits the folded block computes. A quantized
        # `prev` (v_proj, up_proj) has its row scales divided and re-rounded through the scale
        # dtype (`awq.rescale_rows`), and even unrounded (x W^T) / s != x (W / s)^T in floats.
        # A norm `prev` lies in no stage, and the group's stage has nothing kept yet (its
        # linears are not final), so there the drop costs nothing.
        if self.stage_cache is not None:
            self.stage_cache.invalidate(prev, linears)

    def sample_rows(self, group: str, n: int, offset: int = 0, total: int | None = None) -> Tensor:
        """This worker's part of the clip search's n rows of `group` (`awq_search.sample_rows`)."""
        inputs = self.captures[group].inputs
        return awq_search.sample_rows(inputs, n, offset, total, self.scales.get(group))

    # --- solving -------------------------------------------------------------------------

    def _each_part(self, parts) -> Iterator[dict[str, GroupStats]]:
        """Per-worker statistics one at a time (nested lists flattened), each through
        `resolve`, so the solving worker holds the running sum and one part, never all."""
        for part in parts:
            if isinstance(part, list | tuple):
                yield from self._each_part(part)
            else:
                yield self.resolve(part)

    # The statistics handed to `solve` are this process's own (the local executor's): the
    # first becomes the running sum instead of being copied. A remote worker receives read-only
    # buffers instead (see cluster/).
    owns_parts = True

    def resolve(self, part: Any) -> dict[str, GroupStats]:
        """A part as handed in; a remote worker fetches a reference here (see cluster/)."""
        return part

    def solve(
        self, tasks: list[SolveTask], *stats: dict[str, GroupStats]
    ) -> tuple[dict[str, QuantizedWeight | list[RowSlice]], dict[str, float]]:
        """Quantize the tasks' linears from the (per-worker) statistics (`solvers.solve_task`);
        weights are not changed here (see `apply`). The quantized weights and losses by
        linear; a row-split task's weight comes as a `RowSlice` in a list (a worker may get
        several slices of one linear), its loss added to the linear's."""
        t = time.perf_counter()
        only = {t.group for t in tasks}
        merged = merge_stats(self._each_part(stats), own_first=self.owns_parts, only=only) if stats else {}
        weights: dict[str, QuantizedWeight | list[RowSlice]] = {}
        losses: dict[str, float] = {}
        for task in tasks:
            w, loss = solve_task(task, self.block, merged, scales=self.scales, originals=self.originals,
                                 spec=self.spec, q=self.cfg.quant)
            for name, qw in w.items():
                if task.rows is None:
                    weights[name] = qw
                else:
                    weights.setdefault(name, []).append(RowSlice(*task.rows, qw))
            for name, value in loss.items():
                losses[name] = losses.get(name, 0.0) + value
        self.profile.solve_s += time.perf_counter() - t
        return weights, losses

    def apply(self, *parts: dict[str, QuantizedWeight | list[RowSlice]]) -> None:
        """Set the solved linears' weights to their dequantized codes (every worker); a
        row-split linear's slices, from all parts, are joined in row order first."""
        slices: dict[str, list[RowSlice]] = {}
        for part in parts:
            for name, qw in part.items():
                if isinstance(qw, list):
                    slices.setdefault(name, []).extend(qw)
                else:
                    self._set_quantized(name, qw)
        for name, got in slices.items():
            self._set_quantized(name, join_row_slices(name, got, self._lin(name).out_features))

    def _set_quantized(self, name: str, qw: QuantizedWeight) -> None:
        lin = self._lin(name)
        # A data-free run of a packed export leaves the block's weight as it was: no stream runs
        # through the block again and the exporter reads the solved codes.
        if self.store.streams() or self.exporter.reads_applied_weights:
            with torch.no_grad():
                lin.weight.copy_(qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype))
        self.results[name] = LayerResult(qw, 0.0)
        self.inputs.attach(name, lin)
        if self.stage_cache is not None:
            self.stage_cache.mark_final([name])

    def end_group(self, group: str) -> None:
        """Drop what was kept for a group's AWQ search (the groups are searched and solved one
        after another, so the unscaled weights kept are this group's)."""
        self.captures.pop(group, None)
        self.scales.pop(group, None)
        self.originals.clear()

    def end_block(self, block_file: str | None) -> dict[str, Any]:
        """Propagate calibration and evaluation streams, start writing the block's exported
        tensors (when `block_file` is given: this worker writes this block) in the background,
        while the next block runs (its sha256 from `block_file_digest`), and free the block."""
        t = time.perf_counter()
        cache_bytes = 0
        if self.store.has("calib_next"):
            self.store.rename("calib_next", "calib")
        elif self.store.has("calib"):
            self.streams.through("calib", self.block, self.index, self.stage_cache)
        if self.stage_cache is not None:
            cache_bytes = self.stage_cache.nbytes()
            self.stage_cache.clear()
            self.stage_cache = None
        self.profile.forward_s += time.perf_counter() - t
        t = time.perf_counter()
        for stream in ("eval_q", "task_q"):
            if self.store.has(stream):
                self.streams.through(stream, self.block, self.index)
        self.profile.extra["eval_s"] = self.profile.extra.get("eval_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        if block_file is not None:
            tensors = dict(self.exporter.block_tensors(
                self.index, self.block, {n: r.weight for n, r in self.results.items()}, inputs=self.inputs.params
            ))
            self.block_files.submit(block_file, tensors)
            del tensors
        self.profile.extra["export_s"] = time.perf_counter() - t
        self.inputs.clear()
        self.source.release(self.block)
        self.block = None
        self.experts = None
        self.captures, self.originals, self.scales = {}, {}, {}
        trim_heap()
        p = self.profile
        return {
            "worker": self.name, "forward_s": p.forward_s, "stats_s": p.stats_s, "solve_s": p.solve_s,
            **{k: v for k, v in p.extra.items()}, "activation_bytes": self.store.nbytes("calib"),
            "stage_cache_bytes": cache_bytes, "spill": self.store.stats(),
            "peak_rss_bytes": peak_rss_bytes(),
            **({"kernels": ran} if (ran := select.take_ran()) else {}),
        }

    # --- outside the blocks --------------------------------------------------------------

    def assemble(self, jobs: list[tuple[str, list, list[str | None]]]) -> dict[str, str]:
        """Write final shards (path, tensor specs, the state file of each: None for a tensor
        outside the blocks, read from the source as exported); return each shard's sha256 by
        path, hashed as it was written."""
        return {path: assemble_shard(path, specs, files, self.exporter.other_tensor) for path, specs, files in jobs}

    def nll(self) -> dict[str, tuple[float, int]]:
        """Summed next-token NLL and token count of each evaluation stream on this share."""
        out: dict[str, tuple[float, int]] = {}
        if self.eval_tokens is None or len(self.eval_tokens) == 0:
            return out
        norm = self.source.load(self.adapter.final_norm)
        head = self.source.load(self.adapter.lm_head)
        bs = self.cfg.eval.batch_size
        for stream in ("eval_q", "eval_fp"):
            if self.store.has(stream):
                batches = self.store.iter(stream)
                out[stream] = stream_nll(norm, head.weight, batches, self.eval_tokens, bs)
        self.source.release(norm)
        self.source.release(head)
        return out

    def task_scores(self) -> dict[str, list[tuple[float, bool]]]:
        """(log-probability, greedy) of each of this share's task sequences, per task stream
        (`task_q`, `task_fp`), in sequence order."""
        out: dict[str, list[tuple[float, bool]]] = {}
        if self.task_share is None or len(self.task_share) == 0:
            return out
        norm = self.source.load(self.adapter.final_norm)
        head = self.source.load(self.adapter.lm_head)
        for stream in ("task_q", "task_fp"):
            if self.store.has(stream):
                out[stream] = score_sequences(norm, head.weight, self.store.iter(stream), self.task_share,
                                              self.cfg.eval.batch_size)
        self.source.release(norm)
        self.source.release(head)
        return out

    # --- resumable state ------------------------------------------------------------------

    def block_file_digest(self, block_file: str) -> str:
        """Wait for the background write of `block_file` (`end_block`); its sha256."""
        return self.block_files.result(block_file)

    def begin_save_activations(self, path: str) -> None:
        """Start writing this share's streams to `path` in the background (`ActivationCheckpointer`)."""
        self.checkpoints.begin(path)

    def end_save_activations(self) -> str | None:
        """Wait for that write; its sha256, or None when none was pending."""
        return self.checkpoints.end()

    def load_activations(self, path: str) -> None:
        """Replace this worker's streams with a saved checkpoint."""
        self.checkpoints.load(path, device=self.source.device)

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def close(self) -> None:
        self.checkpoints.close()
        self.block_files.close()
        self.store.clear()
