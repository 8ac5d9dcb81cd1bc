"""Checking a run before any weight is read: model directory, scheme, data, output directory.

`prepare` opens the model lazily (config, index, skeleton on the meta device), checks the
scheme against the layer shapes and the export format, reads and tokenizes the calibration
and evaluation text, and proves the output directory is writable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shardquant.config import RunConfig
from shardquant.data import load_text, token_windows
from shardquant.errors import UserError
from shardquant.execution import spill
from shardquant.export.base import Exporter
from shardquant.export.formats import quantized_linears
from shardquant.export.registry import get_exporter
from shardquant.kernels import select
from shardquant.model.source import ModelSource

if TYPE_CHECKING:
    from shardquant.tasks.harness import TaskRun


@dataclass
class Prepared:
    """A validated run: opened model, token windows, output directory; no weights read."""

    cfg: RunConfig
    source: ModelSource
    exporter: Exporter | None  # None for `eval`, which exports nothing
    calib: torch.Tensor | None
    evals: torch.Tensor | None
    output: Path
    tasks: TaskRun | None = None  # eval.tasks, their requests collected (`tasks.harness.collect`)


def check_scheme(cfg: RunConfig, source: ModelSource) -> None:
    """Refuse a scheme that cannot apply to the shapes of the linears it quantizes (those
    `quant.ignore` leaves out may have any shape)."""
    g = cfg.quant.group_size
    if cfg.quant.method == "none" or g == -1:
        return
    shapes = source.linear_shapes()
    for i in range(source.num_blocks):
        for name in quantized_linears(cfg.quant, source.adapter.blocks, i, source.block_linears(i)):
            in_features = shapes[name][1]
            if in_features % g:
                raise UserError(
                    f"quant.group_size={g} does not divide the input size {in_features} of {name}; "
                    f"pick a divisor of {in_features} or -1 (per channel), or list it in quant.ignore"
                )


def check_kernels(cfg: RunConfig, source: ModelSource) -> None:
    """Refuse `kernels.mode: triton` where the kernels cannot run: triton does not import, or
    a local run computes on the CPU outside triton's interpreter (TRITON_INTERPRET=1)."""
    if cfg.kernels.mode != "triton":
        return
    err = select.triton_error()
    if err is not None:
        raise UserError(f"kernels.mode: triton needs the triton package ({err}); use auto or torch")
    if cfg.cluster.backend == "local" and source.device.type == "cpu" and not select.interpreting():
        raise UserError("kernels.mode: triton needs a CUDA device (model.device is the CPU); use auto or torch")


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
        packed=not need_calib,  # eval reads packed checkpoints; quantize refuses them
    )
    if need_calib:  # `eval` quantizes nothing: the quant section does not apply
        check_scheme(cfg, source)
    check_kernels(cfg, source)
    spill.check(cfg.cluster.spill)
    exporter = get_exporter(cfg.export.format, source, cfg.quant) if need_calib else None
    tokenizer = source.tokenizer()
    calib = None
    if need_calib and cfg.quant.needs_calibration:  # data-free RTN reads none
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
    tasks = prepare_tasks(cfg, source, tokenizer)
    output = prepare_output(cfg.output)
    return Prepared(cfg, source, exporter, calib, evals, output, tasks)


def prepare_tasks(cfg: RunConfig, source: ModelSource, tokenizer) -> TaskRun | None:
    """eval.tasks' requests, collected by running the harness once (no weights read)."""
    e = cfg.eval
    if not (e.enabled and e.tasks):
        return None
    from shardquant.tasks.harness import TaskSpec, collect

    spec = TaskSpec(tuple(e.tasks), tuple(e.task_paths), e.task_limit, e.num_fewshot)
    return collect(spec, tokenizer, source.config, e.task_max_length)
