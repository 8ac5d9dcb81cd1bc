"""One process's share of a blockwise run.

A `BlockWorker` owns a contiguous share of the calibration and evaluation windows (their
activations, kept in an `ActivationStore`) and, one at a time, a materialized block. The
driver (see `calibrate.calibrate_block` and `pipeline.quantize`) calls its steps in order:
`begin_block`, then per observation phase `observe` (statistics as exact (sum, count)
accumulators, reduced by the executor), the AWQ steps, `solve` on the worker that owns a
linear, `apply` everywhere, and `end_block` (propagate, evaluate, write the block's tensors).

The local executor runs one worker in-process; the Ray executor wraps the same class in
actors, so both go through exactly this code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shardquant.algorithms import awq
from shardquant.algorithms.gptq import GPTQSolver
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import MSEGrid, QuantizedWeight
from shardquant.algorithms.rtn import quantize_rtn
from shardquant.calib.stage_cache import StageCache
from shardquant.calib.steps import (
    BlockProfile,
    GroupStats,
    LayerResult,
    SolveTask,
    _first,
    block_work,
    fold_scales,
    merge_stats,
    quant_spec,
)
from shardquant.config import RunConfig
from shardquant.execution.activations import ActivationStore
from shardquant.execution.memory import trim_heap
from shardquant.export.registry import get_exporter
from shardquant.model.forward import BlockRunner, embed_batches, stream_nll
from shardquant.model.source import ModelSource
from shardquant.record.report import peak_rss_bytes
from shardquant.record.state import assemble_shard, load_tensors, save_tensors
from shardquant.tools.plan import split_range


@dataclass
class _Capture:
    inputs: list[Tensor] = field(default_factory=list)
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    hessian: HessianAccumulator | None = None


def _take_windows(obj: Any, rows: Tensor, batch: int) -> Any:
    """``obj`` (a call's args or kwargs, nested) with every tensor whose leading dim is the
    batch cut to the windows ``rows``; batch-free tensors (rotary tables, a [1, T] position
    row) are left whole."""
    if isinstance(obj, Tensor):
        return obj[rows.to(obj.device)] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_take_windows(o, rows, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_windows(v, rows, batch) for k, v in obj.items()}
    return obj


def sample_calls(cap: _Capture, n: int | None, offset: int = 0, total: int | None = None) -> list[tuple[tuple, dict]]:
    """The captured consumer calls cut to ``n`` whole windows evenly spaced over all workers'
    windows (this worker's are [offset, offset + own) of ``total``; None: this worker alone);
    every call when ``n`` is None or covers them all."""
    sizes = [x.shape[0] for x in cap.inputs]
    own = sum(sizes)
    total = own if total is None else total
    if n is None or n >= total or len(sizes) != len(cap.calls):
        return list(cap.calls)
    idx = awq.even_indices(total, n)
    idx = idx[(idx >= offset) & (idx < offset + own)] - offset
    out, start = [], 0
    for (args, kwargs), b in zip(cap.calls, sizes, strict=True):
        mine = idx[(idx >= start) & (idx < start + b)] - start
        start += b
        if len(mine) == b:
            out.append((args, kwargs))
        elif len(mine):
            out.append((_take_windows(args, mine, b), _take_windows(kwargs, mine, b)))
    return out


class BlockWorker:
    """A share of the samples, the current block, and the steps that work on them."""

    def __init__(self, cfg: RunConfig | dict, rank: int = 0, world: int = 1, *, name: str = "local"):
        self.cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg)
        self.rank, self.world, self.name = rank, world, name
        c = self.cfg
        self.source = ModelSource(
            c.model.path, dtype=c.model.dtype, device=c.model.device, trust_remote_code=c.model.trust_remote_code
        )
        self.adapter = self.source.adapter
        self.exporter = get_exporter(c.export.format, self.source, c.quant)
        self.runner = BlockRunner(self.adapter, self.source.skeleton.config, self.source.rotary())
        self.spec = quant_spec(c.quant)
        budget = c.cluster.activation_memory
        self.store = ActivationStore(budget, c.cluster.spill_dir, tag=f"{name}")
        self.block: nn.Module | None = None
        self.index = -1
        self.results: dict[str, LayerResult] = {}
        self.captures: dict[str, _Capture] = {}
        self._saver: ThreadPoolExecutor | None = None
        self._saving: Future[str] | None = None
        self.originals: dict[str, Tensor] = {}
        self.candidates: dict[str, list[Tensor]] = {}
        self.scales: dict[str, Tensor] = {}
        self.profile = BlockProfile()
        self.stage_cache: StageCache | None = None
        self.groups = {g.name: g for g in self.adapter.groups}
        self.eval_tokens: Tensor | None = None
        self.do_fp_eval = False

    # --- samples -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        import os
        import socket

        return {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(), "device": str(self.source.device)}

    def setup(self, calib: Tensor | None, evals: Tensor | None, *, do_fp_eval: bool) -> int:
        """Embed this worker's share of the calibration and evaluation windows; return its
        number of calibration windows."""
        dev = self.source.device
        emb = self.source.load(self.adapter.embed)
        n_calib = 0
        if calib is not None:
            a, b = split_range(len(calib), self.world, self.rank)
            n_calib = b - a
            self.store.put("calib", embed_batches(emb, calib[a:b], self.cfg.calib.batch_size, dev))
        if evals is not None:
            a, b = split_range(len(evals), self.world, self.rank)
            self.eval_tokens = evals[a:b]
            batches = embed_batches(emb, self.eval_tokens, self.cfg.eval.batch_size, dev)
            self.store.put("eval_q", batches)
            if do_fp_eval:
                self.store.put("eval_fp", [b.clone() for b in batches])
        self.do_fp_eval = do_fp_eval
        self.source.release(emb)
        return n_calib

    def activation_bytes(self) -> int:
        return self.store.nbytes("calib")

    # --- one block -----------------------------------------------------------------------

    def begin_block(self, index: int) -> None:
        """Load block `index`; run the fp evaluation stream (and the fp calibration stream
        when propagating fp) through the original weights."""
        self.profile = BlockProfile()
        t = time.perf_counter()
        self.block = self.source.block(index)
        self.index = index
        self.profile.extra["load_s"] = time.perf_counter() - t
        self.results, self.captures, self.originals, self.candidates, self.scales = {}, {}, {}, {}, {}
        self.stage_cache = None
        if self.cfg.calib.reuse_stages and self.cfg.quant.true_sequential:
            block_name = self.adapter.block_prefix(index).rstrip(".")
            quantized = {n for _, names in block_work(self.adapter, block_name, self.cfg.quant) for n in names}
            linears = self.adapter.linears()
            self.stage_cache = StageCache(
                self.block, self.adapter.stages, linears, [n for n in linears if n not in quantized]
            )
        t = time.perf_counter()
        if self.do_fp_eval and self.store.has("eval_fp"):
            self.store.map("eval_fp", lambda h: self.runner.forward(self.block, index, h))
        self.profile.extra["eval_s"] = time.perf_counter() - t
        if self.cfg.calib.propagate == "fp" and self.cfg.quant.method != "none":
            t = time.perf_counter()
            self.store.put("calib_next", [self.runner.forward(self.block, index, h) for h in self.store.iter("calib")])
            self.profile.forward_s += time.perf_counter() - t

    def _lin(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def observe(
        self, groups: list[tuple[str, str]], *, hessian: bool, channel: bool, capture: dict[str, str | None]
    ) -> dict[str, GroupStats]:
        """Run the calibration share through the block up to the last group's input and
        accumulate each group's statistics. `groups` is [(group name, first linear)];
        `capture` maps a group to its consumer module when its inputs (and the consumer's
        calls) must be kept for the AWQ search."""
        stats: dict[str, GroupStats] = {}
        handles = []
        stats_time = [0.0]
        stop_inputs: list[Tensor] = []
        for gname, first_name in groups:
            first = self._lin(first_name)
            st = stats[gname] = GroupStats(
                HessianAccumulator(first.in_features, device=first.weight.device) if hessian else None,
                awq.ChannelStats(first.in_features, device=first.weight.device) if channel else None,
            )
            cap = None
            if gname in capture:
                cap = self.captures[gname] = _Capture(hessian=st.hessian)
                consumer = capture[gname]
                if consumer:

                    def call_hook(_mod, args, kwargs, cap=cap):
                        cap.calls.append((args, kwargs))

                    handles.append(self._lin(consumer).register_forward_pre_hook(call_hook, with_kwargs=True))

            keep = stop_inputs if (gname, first_name) == groups[-1] else None

            def hook(_mod, args, st=st, cap=cap, keep=keep):
                t0 = time.perf_counter()
                x = args[0].detach()
                if cap is not None:
                    cap.inputs.append(x)
                if keep is not None:
                    keep.append(x)
                if st.hessian is not None:
                    st.hessian.add(x)
                if st.channel is not None:
                    st.channel.add(x)
                stats_time[0] += time.perf_counter() - t0

            handles.append(first.register_forward_pre_hook(hook))
        t = time.perf_counter()
        try:
            self._forward_calib(stop_at=self._lin(groups[-1][1]))
        finally:
            for h in handles:
                h.remove()
        if self.stage_cache is not None:
            last, first = groups[-1]
            self.stage_cache.offer_tail(first, self.groups[last].linears, stop_inputs)
        self.profile.forward_s += time.perf_counter() - t - stats_time[0]
        self.profile.stats_s += stats_time[0]
        return stats

    def _forward_calib(self, *, stop_at: nn.Module | None = None) -> list[Tensor]:
        """The calibration share through the current block (reusing finished stages)."""
        batches = self.store.iter("calib")
        if self.stage_cache is None:
            return self.runner.forward_all(self.block, self.index, batches, stop_at=stop_at)
        with self.stage_cache.active(self.store.count("calib")):
            return self.runner.forward_all(self.block, self.index, self.stage_cache.batches(batches), stop_at=stop_at)

    def _propagate_calib(self) -> None:
        """Replace the calibration share by the current block's output, batch by batch."""
        cache = self.stage_cache
        if cache is None:
            self.store.map("calib", lambda h: self.runner.forward(self.block, self.index, h))
            return
        order = iter(range(self.store.count("calib")))

        def step(h: Tensor) -> Tensor:
            cache.batch = next(order)
            return self.runner.forward(self.block, self.index, h)

        with cache.active(self.store.count("calib"), record=False):
            self.store.map("calib", step)

    def observe_parts(
        self, groups: list[tuple[str, str]], *, hessian: bool, channel: bool, capture: dict[str, str | None]
    ) -> tuple[dict[str, GroupStats], dict[str, tuple[Tensor, int]]]:
        """`observe`, plus each group's channel (sum, count) apart: the small part a driver
        fetches (for AWQ) while the Hessians go straight to the workers that solve."""
        stats = self.observe(groups, hessian=hessian, channel=channel, capture=capture)
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
        """Summed squared error of the consumer's output for each candidate scale (weights
        restored after), and the element count, over this worker's part of the sample.

        A consumer that is one of the group's linears (or, with `quant.awq_search_objective:
        linears`, the group's own linears in place of any consumer) is measured exactly on
        every captured row through the group's Gram matrix; any other (attention, MLP) is run on
        `quant.awq_search_samples` whole windows evenly spaced over all workers' windows
        (this worker's are [offset, offset + own) of `total`)."""
        t = time.perf_counter()
        q = self.cfg.quant
        lins = {n: self._lin(n) for n in linears}
        originals = {n: lin.weight.detach().clone() for n, lin in lins.items()}
        self.originals.update({n: originals[n].float().clone() for n in quantized})
        w_mean = awq.weight_mean([originals[n] for n in quantized], self.spec) if q.awq_duo_scaling else None
        candidates = awq.candidate_scales(x_mean.to(originals[quantized[0]].device), grid=q.awq_grid, w_mean=w_mean)
        self.candidates[group] = candidates
        cap = self.captures[group]
        if q.awq_search_objective == "linears" and cap.hessian is not None:
            totals, count = self._linear_losses(cap.hessian, [originals[n] for n in quantized], candidates)
        elif consumer in quantized and cap.hessian is not None:
            totals, count = self._linear_losses(cap.hessian, [originals[consumer]], candidates)
        else:
            totals, count = self._module_losses(
                self.block.get_submodule(consumer), lins, quantized, originals, candidates,
                sample_calls(cap, q.awq_search_samples, offset, total),
            )
        self.profile.extra["search_s"] = self.profile.extra.get("search_s", 0.0) + time.perf_counter() - t
        return totals, count

    def _linear_losses(
        self, hessian: HessianAccumulator, weights: list[Tensor], candidates: list[Tensor]
    ) -> tuple[list[float], int]:
        """Summed output error of linears sharing the input, exactly, through its Gram matrix."""
        gram = hessian.gram()
        ws = [w.float() for w in weights]
        totals = [
            sum(awq.linear_output_error(awq.scaled_fake_quantize(w, s, self.spec) - w, gram) for w in ws)
            for s in candidates
        ]
        return totals, hessian.count * sum(w.shape[0] for w in ws)

    def _module_losses(
        self,
        module: nn.Module,
        lins: dict[str, nn.Linear],
        quantized: tuple[str, ...],
        originals: dict[str, Tensor],
        candidates: list[Tensor],
        calls: list[tuple[tuple, dict]],
    ) -> tuple[list[float], int]:
        with torch.no_grad():
            refs = [_first(module(*a, **kw)) for a, kw in calls]
        totals, count = [], 0
        try:
            with torch.no_grad():
                for s in candidates:
                    for n, lin in lins.items():
                        if n in quantized:
                            lin.weight.copy_(awq.scaled_fake_quantize(originals[n], s, self.spec).to(lin.weight.dtype))
                        else:
                            lin.weight.copy_(originals[n])
                    total, count = 0.0, 0
                    for (a, kw), ref in zip(calls, refs, strict=True):
                        y = _first(module(*a, **kw))
                        total += float((y.float() - ref.float()).pow(2).sum())
                        count += y.numel()
                    totals.append(total)
        finally:
            with torch.no_grad():
                for n, lin in lins.items():
                    lin.weight.copy_(originals[n])
        return totals, count

    def fold(self, group: str, choice: int | None, prev: str, linears: tuple[str, ...]) -> None:
        """Apply candidate `choice` of the last search (None: leave unscaled) to the group."""
        from shardquant.model.adapters import InputGroup

        if choice is None:
            self.candidates.pop(group, None)
            return
        s = self.candidates.pop(group)[choice].to(self._lin(linears[0]).weight.device)
        self.scales[group] = s
        fold_scales(self.block, InputGroup(group, prev, linears), s, self.results)
        if self.stage_cache is not None:
            self.stage_cache.invalidate(prev, linears)

    def sample_rows(self, group: str, n: int, offset: int = 0, total: int | None = None) -> Tensor:
        """This worker's part of n rows evenly spaced over all workers' captured inputs of
        `group` (its rows are [offset, offset + own) of `total`; None: this worker alone),
        divided by the group's scales when it was scaled."""
        inputs = self.captures[group].inputs
        if total is None:
            rows = awq.subsample_rows(inputs, n)
        else:
            idx = awq.even_indices(total, n)
            own = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in inputs)
            rows = awq.take_rows(inputs, idx[(idx >= offset) & (idx < offset + own)] - offset)
        s = self.scales.get(group)
        return rows if s is None else rows / s.to(rows.device)

    # --- solving -------------------------------------------------------------------------

    def _each_part(self, parts) -> Iterator[dict[str, GroupStats]]:
        """Per-worker statistics one at a time (nested lists flattened), each through
        `resolve`, so the solving worker holds the running sum and one part, never all."""
        for part in parts:
            if isinstance(part, list | tuple):
                yield from self._each_part(part)
            else:
                yield self.resolve(part)

    def resolve(self, part: Any) -> dict[str, GroupStats]:
        """A part as handed in; a remote worker fetches a reference here (see cluster/)."""
        return part

    def solve(self, tasks: list[SolveTask], *stats: dict[str, GroupStats]) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
        """Quantize the tasks' linears from the (per-worker) statistics; weights are not
        changed here (see `apply`). Returns the quantized weights and losses by linear."""
        t = time.perf_counter()
        q = self.cfg.quant
        merged = merge_stats(self._each_part(stats)) if stats else {}
        mse = MSEGrid(grid=q.mse_grid, max_shrink=q.mse_max_shrink, norm=q.mse_norm) if q.mse else None
        weights: dict[str, QuantizedWeight] = {}
        losses: dict[str, float] = {}
        for task in tasks:
            s = self.scales.get(task.group)
            if task.kind == "rtn":
                for name in task.linears:
                    w = self._lin(name).weight.float()
                    qw = quantize_rtn(w, self.spec, mse=mse)
                    weights[name] = qw
                    losses[name] = float((w - qw.dequantize().to(w.device)).pow(2).sum())
                continue
            if task.kind in ("gptq", "awq+gptq"):
                H = merged[task.group].hessian.hessian()
                if s is not None:
                    H = awq.scaled_hessian(H, s)
                solver = GPTQSolver(H, damp=q.damp, act_order=q.act_order, reorder=q.reorder,
                                    group_size=q.group_size)
                ws = [self._weight(name, s) for name in task.linears]
                solved = solver.quantize_many(ws, self.spec, block_size=q.block_size,
                                              static_groups=q.static_groups, mse=mse, group_range=q.group_range)
                for name, res in zip(task.linears, solved, strict=True):
                    weights[name], losses[name] = res.weight, float(res.loss)
                del solver, ws, solved
                continue
            # awq: RTN on the scaled weights, with a clip search on the sampled rows.
            clip_x = task.clip_rows
            acc = merged[task.group].hessian
            gram = acc.gram()
            for name in task.linears:
                w = self._weight(name, s)
                target = w
                if task.clip and name not in task.clip_skip and clip_x is not None:
                    found = awq.search_clip(
                        w, clip_x.to(w.device), self.spec, grid=q.awq_clip_grid, max_shrink=q.awq_clip_max_shrink
                    )
                    target = awq.apply_clip(w, self.spec, found.ratio)
                qw = quantize_rtn(target, self.spec)
                weights[name] = qw
                delta = w - qw.dequantize().to(w.device)
                if s is not None:
                    delta = delta / s.to(delta.device)  # the error seen by the unscaled inputs
                losses[name] = awq.linear_output_error(delta, gram) / acc.count
        self.profile.solve_s += time.perf_counter() - t
        return weights, losses

    def _weight(self, name: str, s: Tensor | None) -> Tensor:
        """The float32 weight to quantize: the original times the group's scales, if any."""
        if s is not None and name in self.originals:
            return self.originals[name] * s
        return self._lin(name).weight.float()

    def apply(self, *parts: dict[str, QuantizedWeight]) -> None:
        """Set the solved linears' weights to their dequantized codes (every worker)."""
        for part in parts:
            for name, qw in part.items():
                lin = self._lin(name)
                with torch.no_grad():
                    lin.weight.copy_(qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype))
                self.results[name] = LayerResult(qw, 0.0)
                if self.stage_cache is not None:
                    self.stage_cache.mark_final([name])

    def end_group(self, group: str) -> None:
        """Drop what was kept for a group's AWQ search."""
        self.captures.pop(group, None)
        self.scales.pop(group, None)

    def end_block(self, block_file: str | None) -> dict[str, Any]:
        """Propagate calibration and evaluation streams, write the block's exported tensors
        (when `block_file` is given: this worker writes this block), free the block."""
        t = time.perf_counter()
        cache_bytes = 0
        if self.store.has("calib_next"):
            self.store.rename("calib_next", "calib")
        elif self.store.has("calib"):
            self._propagate_calib()
        if self.stage_cache is not None:
            cache_bytes = self.stage_cache.nbytes()
            self.stage_cache.clear()
            self.stage_cache = None
        self.profile.forward_s += time.perf_counter() - t
        t = time.perf_counter()
        if self.store.has("eval_q"):
            self.store.map("eval_q", lambda h: self.runner.forward(self.block, self.index, h))
        self.profile.extra["eval_s"] = self.profile.extra.get("eval_s", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        digest = None
        if block_file is not None:
            tensors = dict(
                self.exporter.block_tensors(self.index, self.block, {n: r.weight for n, r in self.results.items()})
            )
            digest = save_tensors(Path(block_file), tensors)
        self.profile.extra["export_s"] = time.perf_counter() - t
        self.source.release(self.block)
        self.block = None
        self.captures, self.originals, self.scales = {}, {}, {}
        trim_heap()
        p = self.profile
        return {
            "worker": self.name, "forward_s": p.forward_s, "stats_s": p.stats_s, "solve_s": p.solve_s,
            **{k: v for k, v in p.extra.items()}, "activation_bytes": self.store.nbytes("calib"),
            "stage_cache_bytes": cache_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            **({"block_sha256": digest} if digest else {}),
        }

    # --- outside the blocks --------------------------------------------------------------

    def write_other(self, path: str) -> None:
        """The tensors outside the blocks (embedding, final norm, lm_head) as one state file."""
        save_tensors(Path(path), dict(self.exporter.other_tensors()))

    def assemble(self, jobs: list[tuple[str, list, list[str]]]) -> int:
        """Write final shards (path, tensor specs, the state file of each); return bytes."""
        total = 0
        for path, specs, files in jobs:
            assemble_shard(path, specs, files)
            total += sum(s.nbytes for s in specs)
        return total

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

    # --- resumable state ------------------------------------------------------------------

    def save_activations(self, path: str) -> str:
        """Every stream of this worker's share, exactly, in one file (atomic); its sha256."""
        self.begin_save_activations(path)
        return self.end_save_activations()

    def begin_save_activations(self, path: str) -> None:
        """Start `save_activations` in a background thread, so the next block calibrates
        while the checkpoint is written; `end_save_activations` waits for it. The batches are
        never changed in place (a stream's batches are replaced), so the ones being written
        stay valid. A store that spills is written now: its batches, read back for the
        write, would otherwise stay in memory, over its budget, while the next block runs."""
        self.end_save_activations()
        tensors = {}
        for stream in self.store.streams():
            for i, h in enumerate(self.store.iter(stream)):
                tensors[f"{stream}.{i:06d}"] = h
        if self.store.spilled:
            done: Future[str] = Future()
            try:
                done.set_result(save_tensors(Path(path), tensors))
            except BaseException as e:
                done.set_exception(e)
            self._saving = done
            return
        if self._saver is None:
            self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardquant-save")
        self._saving = self._saver.submit(save_tensors, Path(path), tensors)

    def end_save_activations(self) -> str | None:
        """Wait for the checkpoint `begin_save_activations` started (re-raising its error);
        its sha256, or None when none was pending."""
        saving, self._saving = self._saving, None
        return None if saving is None else saving.result()

    def load_activations(self, path: str) -> None:
        """Replace this worker's streams with those saved by `save_activations`."""
        tensors = load_tensors(Path(path), device=self.source.device)
        streams: dict[str, list[tuple[int, Tensor]]] = {}
        for key, t in tensors.items():
            stream, i = key.rsplit(".", 1)
            streams.setdefault(stream, []).append((int(i), t))
        self.store.clear()
        for stream, items in streams.items():
            self.store.put(stream, [t for _, t in sorted(items, key=lambda x: x[0])])

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def close(self) -> None:
        if self._saver is not None:
            self._saver.shutdown(wait=True)
            self._saver = None
        self._saving = None
        self.store.clear()
