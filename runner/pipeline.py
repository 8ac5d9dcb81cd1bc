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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calibrate import BlockProfile, quantize_block
from .config import RunConfig, config_dict, parse_size
from .data import load_text, token_windows
from .errors import UserError
from .export import Exporter, get_exporter
from .forward import BlockRunner, embed_batches, window_nll
from .model import ModelSource
from .report import peak_rss_bytes, write_report
from .shards import ShardWriter, write_json_atomic
from .tracking import make_tracker


@dataclass
class Prepared:
    """A validated run: opened model, token windows, output directory; no weights read."""

    cfg: RunConfig
    source: ModelSource
    exporter: Exporter
    calib: torch.Tensor | None
    evals: torch.Tensor | None
    output: Path


def check_scheme(cfg: RunConfig, source: ModelSource) -> None:
    """Refuse a scheme that cannot apply to this model's layer shapes."""
    g = cfg.quant.group_size
    if g == -1 or cfg.quant.method == "none":
        return
    for name, (_, in_features) in source.linear_shapes().items():
        if in_features % g:
            raise UserError(
                f"quant.group_size={g} does not divide the input size {in_features} of {name}; "
                f"pick a divisor of {in_features} or -1 (per channel)"
            )


def prepare_output(path: str) -> Path:
    """Create the run directory and prove it is writable, before any work."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output: cannot write to '{out}': {e.strerror or e}") from None
    return out


def prepare(cfg: RunConfig, *, need_calib: bool = True) -> Prepared:
    """Validate model, scheme and data and read the token windows; no weights are loaded."""
    source = ModelSource(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    check_scheme(cfg, source)
    exporter = get_exporter(cfg.export.format, source, cfg.quant)
    tokenizer = source.tokenizer()
    calib = None
    if need_calib and cfg.quant.method != "none":
        if not cfg.calib.path:
            raise UserError("missing required config key 'calib.path'")
        text = load_text(
            cfg.calib.path, key="calib.path", text_field=cfg.calib.text_field,
            split=cfg.calib.split, dataset_config=cfg.calib.dataset_config,
        )
        calib = token_windows(
            tokenizer, text, n_samples=cfg.calib.n_samples, seq_len=cfg.calib.seq_len,
            seed=cfg.calib.seed, mode="random", key="calib", source=cfg.calib.path,
        )
    evals = None
    if cfg.eval.enabled and cfg.eval.path:
        text = load_text(
            cfg.eval.path, key="eval.path", text_field=cfg.eval.text_field,
            split=cfg.eval.split, dataset_config=cfg.eval.dataset_config,
        )
        evals = token_windows(
            tokenizer, text, n_samples=cfg.eval.n_samples, seq_len=cfg.eval.seq_len,
            seed=0, mode="sequential", key="eval", source=cfg.eval.path,
        )
    output = prepare_output(cfg.output)
    return Prepared(cfg, source, exporter, calib, evals, output)


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
        nll, count = 0.0, 0
        for i, h in enumerate(hidden):
            s, c = window_nll(norm, head.weight, h, tokens[i * batch_size : i * batch_size + len(h)])
            nll += s
            count += c
        out[name] = math.exp(nll / count)
    source.release(norm)
    source.release(head)
    return out


def quantize(cfg: RunConfig, *, prepared: Prepared | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run calibration, evaluation and export; write report.json; return the report."""
    t_start = time.perf_counter()
    p = prepared or prepare(cfg)
    src, ad, q = p.source, p.source.adapter, cfg.quant
    tracker = make_tracker(cfg.tracking.wandb, p.output)
    tracker.start(config_dict(cfg))
    dev = src.device
    timing = {"load_s": 0.0, "forward_s": 0.0, "stats_s": 0.0, "solve_s": 0.0, "eval_s": 0.0, "export_s": 0.0}

    staging = p.output / ".model.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    writer = ShardWriter(staging, p.exporter.plan(), parse_size(cfg.export.shard_size))

    runner = BlockRunner(ad, src.skeleton.config, src.rotary())
    t = time.perf_counter()
    embedding = src.load(ad.embed)
    calib = embed_batches(embedding, p.calib, cfg.calib.batch_size, dev) if p.calib is not None else []
    eval_bs = cfg.eval.batch_size
    eval_fp = embed_batches(embedding, p.evals, eval_bs, dev) if p.evals is not None else None
    src.release(embedding)
    timing["load_s"] += time.perf_counter() - t
    do_fp = eval_fp is not None and cfg.eval.fp and q.method != "none"
    eval_q = list(eval_fp) if eval_fp is not None else None

    blocks: list[dict[str, Any]] = []
    t_loop = time.perf_counter()
    bar = _progress(src.num_blocks, f"{q.method} {q.bits}-bit") if show_progress else None
    for i in range(src.num_blocks):
        t_block = time.perf_counter()
        name = f"{ad.blocks}.{i}"
        t = time.perf_counter()
        block = src.block(i)
        timing["load_s"] += time.perf_counter() - t

        t = time.perf_counter()
        if do_fp:
            eval_fp = runner.forward_all(block, i, eval_fp)
        timing["eval_s"] += time.perf_counter() - t

        prof = BlockProfile()
        fp_next = None
        if cfg.calib.propagate == "fp" and q.method != "none":
            t = time.perf_counter()
            fp_next = runner.forward_all(block, i, calib)
            prof.forward_s += time.perf_counter() - t
        results = quantize_block(
            block, name, ad, q,
            lambda stop, block=block, i=i, batches=calib: runner.forward_all(block, i, batches, stop_at=stop),
            prof,
        )
        t = time.perf_counter()
        calib = fp_next if fp_next is not None else runner.forward_all(block, i, calib)
        prof.forward_s += time.perf_counter() - t

        t = time.perf_counter()
        if eval_q is not None:
            eval_q = runner.forward_all(block, i, eval_q)
        timing["eval_s"] += time.perf_counter() - t

        t = time.perf_counter()
        for tname, tensor in p.exporter.block_tensors(i, block, {n: r.weight for n, r in results.items()}):
            writer.add(tname, tensor)
        src.release(block)
        timing["export_s"] += time.perf_counter() - t
        for key in ("forward_s", "stats_s", "solve_s"):
            timing[key] += getattr(prof, key)

        losses = {n: r.loss for n, r in results.items()}
        seconds = time.perf_counter() - t_block
        blocks.append({
            "index": i, "seconds": seconds, "worker": "local", "loss": losses,
            "forward_s": prof.forward_s, "stats_s": prof.stats_s, "solve_s": prof.solve_s,
            "activation_bytes": sum(h.numel() * h.element_size() for h in calib),
        })
        if prof.awq:
            blocks[-1]["awq"] = prof.awq
        if prof.notes:
            blocks[-1]["notes"] = prof.notes
        tracker.log_block(blocks[-1])
        if bar is not None:
            worst = max(losses.values()) if losses else 0.0
            bar.set_postfix_str(f"max loss {worst:.3g}")
            bar.update(1)
    if bar is not None:
        bar.close()
    loop_s = time.perf_counter() - t_loop

    ppl: dict[str, float | None] = {"fp": None, "quantized": None}
    if eval_q is not None:
        t = time.perf_counter()
        streams = {"quantized": eval_q}
        if do_fp:
            streams["fp"] = eval_fp
        ppl.update(_perplexity(src, streams, p.evals, eval_bs))
        if q.method == "none" and cfg.eval.fp:
            ppl["fp"] = ppl["quantized"]
        timing["eval_s"] += time.perf_counter() - t

    t = time.perf_counter()
    export_path = p.output / "model"
    for tname, tensor in p.exporter.other_tensors():
        writer.add(tname, tensor)
    writer.finalize()
    p.exporter.write_files(staging)
    _replace_dir(staging, export_path)
    timing["export_s"] += time.perf_counter() - t

    timing["calibrate_s"] = loop_s - timing["eval_s"]
    timing["total_s"] = time.perf_counter() - t_start
    report = {
        "ppl": ppl,
        "timing": timing,
        "memory": {"peak_rss_bytes": peak_rss_bytes()},
        "blocks": blocks,
        "config": config_dict(cfg),
        "export": {"format": cfg.export.format, "path": str(export_path), "bytes": writer.total_bytes},
        "calibration": {
            "windows": 0 if p.calib is None else int(p.calib.shape[0]),
            "tokens": 0 if p.calib is None else int(p.calib.numel()),
        },
        "eval": {"windows": 0 if p.evals is None else int(p.evals.shape[0])},
        "version": _version(),
    }
    files = write_report(p.output, report)
    tracker.finish(report, files)
    return report


def evaluate(cfg: RunConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Perplexity of model.path as it is (blockwise), written to output/eval.json."""
    if not (cfg.eval.enabled and cfg.eval.path):
        raise UserError("eval.path: no evaluation text configured")
    p = prepare(cfg, need_calib=False)
    src, ad = p.source, p.source.adapter
    runner = BlockRunner(ad, src.skeleton.config, src.rotary())
    t0 = time.perf_counter()
    embedding = src.load(ad.embed)
    hidden = embed_batches(embedding, p.evals, cfg.eval.batch_size, src.device)
    src.release(embedding)
    bar = _progress(src.num_blocks, "eval") if show_progress else None
    for i in range(src.num_blocks):
        block = src.block(i)
        hidden = runner.forward_all(block, i, hidden)
        src.release(block)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ppl = _perplexity(src, {"model": hidden}, p.evals, cfg.eval.batch_size)["model"]
    result = {
        "ppl": ppl,
        "model": str(src.root),
        "windows": int(p.evals.shape[0]),
        "seq_len": cfg.eval.seq_len,
        "seconds": time.perf_counter() - t0,
        "memory": {"peak_rss_bytes": peak_rss_bytes()},
        "config": config_dict(cfg),
    }
    write_json_atomic(p.output / "eval.json", result)
    return result


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
    from . import __version__

    return __version__
