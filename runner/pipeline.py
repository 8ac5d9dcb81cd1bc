"""The blockwise loop: the one place that walks a model block by block.

`prepare` checks everything a run needs (model directory, scheme, data, output directory)
without reading a weight. `quantize` then streams calibration (and evaluation) activations
through the blocks one at a time: load the block, observe, solve, propagate, export, free.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from shardquant.config import OTHER_SHARD_SIZE, RunConfig, config_dict, parse_size
from shardquant.errors import UserError
from shardquant.execution.backends import executor_factory
from shardquant.execution.block_loop import (
    PHASES,
    merge_kernels,
    put_record,
    retry_lost,
    run_blocks,
    setup,
    spill_summary,
    stage_overlap,
)
from shardquant.execution.protocol import ExecutorFactory
from shardquant.execution.spill import resolve as resolve_spill
from shardquant.export.manifest import write_manifest
from shardquant.export.shards import (
    adopt_shard,
    plan_shards,
    shard_names,
    write_index,
    write_json_atomic,
)
from shardquant.kernels import select
from shardquant.model.forward import BlockRunner, embed_batches, stream_nll
from shardquant.model.source import ModelSource
from shardquant.prepare import Prepared, prepare
from shardquant.record.report import own_peak_rss_bytes, peak_rss_bytes, write_report
from shardquant.record.state import RunState
from shardquant.record.tracking import make_tracker
from shardquant.tasks.sequences import embed_sequences, score_sequences
from shardquant.tools.fit import Fit, choose
from shardquant.tools.plan import read_model_config


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", file=sys.stderr, dynamic_ncols=True)


def _perplexity(source: ModelSource, streams: dict[str, list[torch.Tensor]], tokens: torch.Tensor,
                batch_size: int) -> dict[str, float]:
    """Final norm + lm_head over each stream of last hidden states -> perplexity per stream."""
    ad = source.adapter
    norm = source.load(ad.final_norm)
    head = source.load(ad.lm_head)
    out = {}
    for name, hidden in streams.items():
        nll, count = stream_nll(norm, head.weight, hidden, tokens, batch_size)
        out[name] = math.exp(nll / count)
    source.release(norm)
    source.release(head)
    return out


def quantize(cfg: RunConfig, *, prepared: Prepared | None = None, show_progress: bool = True,
             executors: ExecutorFactory | None = None) -> dict[str, Any]:
    """Run calibration, evaluation and export; write report.json; return the report.

    `executors` builds the executor; by default the one registered for `cluster.backend`
    (`execution.backends`: local in this process, ray from `shardquant.cluster`).

    Progress is saved after every block in output/state/, so a run that dies (or is
    interrupted) continues at the first unfinished block when the same command is rerun.
    """
    t_start = time.perf_counter()
    p = prepared or prepare(cfg)
    src, q = p.source, cfg.quant
    fit = fit_run(cfg, src)  # before any state is written: a refused fit leaves nothing behind
    state = RunState(p.output)
    workers = 1 if cfg.cluster.backend == "local" else cfg.cluster.workers
    progress = state.start(config_dict(cfg), resume=cfg.resume, workers=workers)
    start = progress["done"]
    if start:
        print(f"shardquant: resuming '{p.output}' at block {start} of {src.num_blocks}", file=sys.stderr)
    tracker = make_tracker(cfg.tracking.wandb, p.output)
    tracker.start(config_dict(cfg))
    do_fp = (p.evals is not None or p.tasks is not None) and cfg.eval.fp and q.method != "none"
    blocks: list[dict[str, Any]] = list(progress["blocks"])
    p = replace(p, cfg=p.cfg.model_copy(update={"quant": fit.cfg.quant}))  # the driver's steps read the choices
    ex = (executors or executor_factory(cfg.cluster.backend))(fit.cfg, src)
    bar = None
    try:
        t = time.perf_counter()
        setup(ex, p, do_fp)
        staged = ex.staged
        if staged:  # finished blocks need not be a prefix: the stages run side by side
            start = len(progress.get("stage_done", []))
        if start and not staged:
            ex.load_activations([str(state.dir / a["file"]) for a in progress["activations"]])
        setup_s = time.perf_counter() - t
        t_loop = time.perf_counter()
        bar = _progress(src.num_blocks, f"{q.method} {q.bits}-bit") if show_progress else None
        if bar is not None:
            bar.update(start)

        def on_record(rec: dict[str, Any]) -> None:
            tracker.log_block(rec)
            if put_record(blocks, rec):  # redone after a lost worker: replaced the old record
                return
            if bar is not None:
                worst = max(rec["loss"].values()) if rec["loss"] else 0.0
                bar.set_postfix_str(f"max loss {worst:.3g}")
                bar.update(1)

        stream_s = run_blocks(ex, p, state, progress, start=start, staged=staged, do_fp=do_fp,
                              on_record=on_record)
        if bar is not None:
            bar.close()
            bar = None
        loop_s = time.perf_counter() - t_loop

        def restore() -> None:  # a replaced worker needs its streams as they were after the blocks
            if staged:  # every block is done: the stages only stream the fp inputs again
                setup(ex, p, do_fp)
                run_blocks(ex, p, state, progress, start=start, staged=True, do_fp=do_fp, on_record=on_record)
            else:
                ex.load_activations([str(state.dir / a["file"]) for a in progress["activations"]])

        t = time.perf_counter()
        ppl = retry_lost(ex, progress, lambda: _perplexities(ex, cfg, p.evals is not None), restore,
                         "evaluating again from the last checkpoint")
        tasks = retry_lost(ex, progress, lambda: _task_results(ex, cfg, p), restore,
                           "scoring the tasks again from the last checkpoint")
        final_eval_s = time.perf_counter() - t

        t = time.perf_counter()
        exported = retry_lost(ex, progress, lambda: _export(ex, p, state, progress), lambda: None,
                              "exporting again")
        export_s = time.perf_counter() - t
        state.finish(progress)
        worker_peaks = ex.peak_rss()
        driver_peak = own_peak_rss_bytes()
        peak = max([peak_rss_bytes(), *worker_peaks])
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        done = progress["done"]
        print(
            f"shardquant: interrupted; {done} of {src.num_blocks} blocks are saved in '{state.dir}'. "
            "Rerun the same command to continue.",
            file=sys.stderr,
        )
        raise
    finally:
        ex.close()

    timing = {k: sum(b.get(k, 0.0) for b in blocks) for k in (*PHASES, "idle_s")}
    timing["load_s"] += setup_s
    timing["eval_s"] += final_eval_s
    timing["export_s"] += export_s
    timing["calibrate_s"] = loop_s - sum(b.get("eval_s", 0.0) for b in blocks[start:])
    timing["total_s"] = time.perf_counter() - t_start
    report = {
        "ppl": ppl,
        "timing": timing,
        "memory": {"peak_rss_bytes": peak, "driver_peak_rss_bytes": driver_peak, "planned_peak_bytes": fit.plan.peak,
                   "auto": fit.to_json()},
        "blocks": sorted(blocks, key=lambda b: b["index"]),
        "spill": spill_summary(blocks, resolve_spill(fit.cfg.cluster.spill, fit.cfg.cluster.spill_dir)),
        "config": config_dict(cfg),
        "export": {"format": cfg.export.format, **exported},
        "calibration": {
            "windows": 0 if p.calib is None else int(p.calib.shape[0]),
            "tokens": 0 if p.calib is None else int(p.calib.numel()),
        },
        "eval": {"windows": 0 if p.evals is None else int(p.evals.shape[0]), **tasks},
        "cluster": {"backend": cfg.cluster.backend, "workers": ex.names, "resumed_at": start or None,
                    "mode": "stages" if staged else "data",
                    "stages": {**stage_overlap(blocks), "stream_s": stream_s} if staged else None,
                    "faults": progress["faults"], "peak_rss_bytes": dict(zip(ex.names, worker_peaks, strict=True))},
        "kernels": {"mode": cfg.kernels.mode, "ran": merge_kernels(b.get("kernels", {}) for b in blocks)},
        "version": _version(),
    }
    files = write_report(p.output, report)
    tracker.finish(report, files)
    return report


def _perplexities(ex, cfg: RunConfig, evaluating: bool) -> dict[str, float | None]:
    """fp and quantized perplexity from every worker's summed NLL of its evaluation windows."""
    ppl: dict[str, float | None] = {"fp": None, "quantized": None}
    if not evaluating:
        return ppl
    sums: dict[str, list[float]] = {}
    for part in ex.nll():
        for stream, (total, count) in part.items():
            acc = sums.setdefault(stream, [0.0, 0])
            acc[0] += total
            acc[1] += count
    ppl["quantized"] = math.exp(sums["eval_q"][0] / sums["eval_q"][1]) if "eval_q" in sums else None
    if "eval_fp" in sums:
        ppl["fp"] = math.exp(sums["eval_fp"][0] / sums["eval_fp"][1])
    if cfg.quant.method == "none" and cfg.eval.fp:
        ppl["fp"] = ppl["quantized"]
    return ppl


def _task_results(ex, cfg: RunConfig, p: Prepared) -> dict[str, Any]:
    """report.json's `eval.tasks` ({fp, quantized} -> task -> metric) and `eval.task_requests`
    from every worker's task-sequence scores, answered to the harness; {} without eval.tasks."""
    if p.tasks is None:
        return {}
    streams: dict[str, list[tuple[float, bool]]] = {}
    for part in ex.task_scores():  # worker order = sequence order
        for stream, scores in part.items():
            streams.setdefault(stream, []).extend(scores)
    named = {"quantized": "task_q", "fp": "task_fp"}
    return task_report(p, {k: streams.get(v) for k, v in named.items()},
                       same_fp=cfg.quant.method == "none" and cfg.eval.fp)


def task_report(p: Prepared, scores: dict[str, list[tuple[float, bool]] | None], *,
                same_fp: bool = False) -> dict[str, Any]:
    """The harness answered from each model's task scores ({fp, quantized} -> scores or None;
    `eval`: {model}):
    report.json's `eval.tasks` (model -> task -> metric), `eval.task_requests`,
    `eval.task_samples` (the file with every request's answer, output/task_samples.json)."""
    from shardquant.tasks.harness import metrics, samples

    out: dict[str, Any] = dict.fromkeys(scores)
    per_doc: dict[str, Any] = {}
    for model, got in scores.items():
        if got is not None:
            result = p.tasks.evaluate(got)
            out[model], per_doc[model] = metrics(result), samples(result)
    if same_fp and out["fp"] is None:
        out["fp"], per_doc["fp"] = out["quantized"], per_doc.get("quantized")
    path = p.output / "task_samples.json"
    write_json_atomic(path, per_doc)
    return {"tasks": out, "task_requests": p.tasks.requests, "task_sequences": len(p.tasks.sequences),
            "task_samples": str(path)}


def fit_run(cfg: RunConfig, source: ModelSource) -> Fit:
    """The run's `auto` settings chosen against its workers' budget (`tools.fit.choose`):
    `cluster.worker_memory`, else a local CUDA device's memory, else none (all stay on)."""
    ray = cfg.cluster.backend != "local"
    device = ("cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu") if ray else source.device.type
    budget = None
    if cfg.cluster.worker_memory is not None:
        budget = parse_size(cfg.cluster.worker_memory)
    elif not ray and source.device.type == "cuda":
        budget = torch.cuda.get_device_properties(source.device).total_memory
    fit = choose(read_model_config(source.root), cfg, device=device, budget=budget)
    if fit.refused:
        raise UserError(fit.refused)
    for line in fit.reasons:
        print(f"shardquant: {line}", file=sys.stderr)
    return fit


def _export(ex, p: Prepared, state: RunState, progress: dict[str, Any]) -> dict[str, Any]:
    """Assemble the planned shards from the block state files and the source's tensors outside
    the blocks (on the workers, in parallel), then index, config and tokenizer; the staging
    directory becomes output/model at once. With `export.shard_size: block` each block's state
    file is adopted as its shard (`adopt_shard`): its bytes are not written again. Returns
    report.json's `export` fields beyond the format."""
    staging = p.output / ".model.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    src, exporter = p.source, p.exporter
    block_plans = [exporter.block_plan(i) for i in range(src.num_blocks)]
    # a block tensor's state file; the others are read from the source
    origin = {spec.name: str(state.block_file(i)) for i, specs in enumerate(block_plans) for spec in specs}
    if p.cfg.export.block_shards:  # shard k < len(adoptable): block file adoptable[k][0], as it is
        adoptable = [(state.block_file(i), specs) for i, specs in enumerate(block_plans) if specs]
        shards = [specs for _, specs in adoptable] + plan_shards(exporter.other_plan(), parse_size(OTHER_SHARD_SIZE))
    else:
        adoptable, shards = [], plan_shards(exporter.plan(), parse_size(p.cfg.export.shard_size))
    names = shard_names(len(shards))
    digests: dict[str, str] = {}
    jobs = []
    for k, specs in enumerate(shards):
        path = staging / names[k]
        if k < len(adoptable) and adopt_shard(adoptable[k][0], path, specs):
            if (digest := progress["files"].get(state.rel(adoptable[k][0]))) is not None:  # else the manifest hashes it
                digests[str(path)] = digest
        else:
            jobs.append((str(path), specs, [origin.get(s.name) for s in specs]))
    digests.update(ex.assemble(jobs))
    write_index(staging, shards)
    exporter.write_files(staging)
    write_manifest(staging, known={Path(path).relative_to(staging).as_posix(): d for path, d in digests.items()})
    export_path = p.output / "model"
    _replace_dir(staging, export_path)
    return {"path": str(export_path), "bytes": sum(s.nbytes for shard in shards for s in shard),
            "shards": len(shards), "adopted_shards": len(shards) - len(jobs)}


def evaluate(cfg: RunConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Perplexity and eval.tasks of model.path as it is, blockwise (a packed checkpoint's
    linears dequantized block by block: `model.packed`), written to output/eval.json."""
    if not (cfg.eval.enabled and (cfg.eval.path or cfg.eval.tasks)):
        raise UserError("eval.path: no evaluation text configured (set eval.path or eval.tasks)")
    p = prepare(cfg, need_calib=False)
    src, ad = p.source, p.source.adapter
    runner = BlockRunner(ad, src.skeleton.config, src.rotary())
    bs = cfg.eval.batch_size
    t0 = time.perf_counter()
    embedding = src.load(ad.embed)
    streams: dict[str, list[torch.Tensor]] = {}
    if p.evals is not None:
        streams["ppl"] = embed_batches(embedding, p.evals, bs, src.device)
    if p.tasks is not None:
        streams["tasks"] = embed_sequences(embedding, p.tasks.sequences, bs, src.device)
    src.release(embedding)
    inputs = src.packed.described_inputs() if src.packed is not None else None
    if inputs is not None:
        print(f"shardquant: inputs quantized as the checkpoint declares ({inputs}): the perplexity is the served "
              "model's", file=sys.stderr)
    bar = _progress(src.num_blocks, "eval") if show_progress else None
    select.take_ran()
    with select.using(cfg.kernels.mode):  # a packed linear the W4A16 kernel runs for stays packed
        for i in range(src.num_blocks):
            block = src.block(i, packed_kernels=True)
            hooks = _input_hooks(src, i, block)
            streams = {k: runner.forward_all(block, i, v) for k, v in streams.items()}
            for h in hooks:
                h.clear()
            src.release(block)
            if bar is not None:
                bar.update(1)
    kernels = {"mode": cfg.kernels.mode, "ran": select.take_ran()}
    if bar is not None:
        bar.close()
    ppl, task_out = None, {}
    if p.evals is not None:
        ppl = _perplexity(src, {"model": streams["ppl"]}, p.evals, bs)["model"]
    if p.tasks is not None:
        norm, head = src.load(ad.final_norm), src.load(ad.lm_head)
        scores = score_sequences(norm, head.weight, streams["tasks"], p.tasks.sequences, bs)
        src.release(norm)
        src.release(head)
        task_out = task_report(p, {"model": scores})
        task_out["tasks"] = task_out["tasks"]["model"]
    result = {
        "ppl": ppl,
        "model": str(src.root),
        "format": src.packed.layout.name if src.packed is not None else "dense",
        "kernels": kernels,
        **({"input_activations": inputs} if inputs is not None else {}),
        "windows": 0 if p.evals is None else int(p.evals.shape[0]),
        "seq_len": cfg.eval.seq_len,
        **task_out,
        "seconds": time.perf_counter() - t0,
        "memory": {"peak_rss_bytes": peak_rss_bytes()},
        "config": config_dict(cfg),
    }
    write_json_atomic(p.output / "eval.json", result)
    return result


def _input_hooks(src: ModelSource, index: int, block: torch.nn.Module) -> list:
    """Pre-hooks quantizing the inputs of block `index`'s linears as the checkpoint declares
    (`calib.inputs.InputQuantizers` with its stored static parameters), one set per distinct
    args; the caller clears them once the block has run."""
    from shardquant.calib.inputs import InputQuantizers

    by_args: dict[str, InputQuantizers] = {}
    for local, (args, params) in src.input_quantization(index).items():
        hooks = by_args.setdefault(args.model_dump_json(), InputQuantizers(args))
        hooks.params[local] = params
        hooks.attach(local, block.get_submodule(local))
    return list(by_args.values())


def _replace_dir(new: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _version() -> str:
    from shardquant import __version__

    return __version__
