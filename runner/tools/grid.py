"""`shardquant grid GRID.yaml`: the benchmark matrix without W&B.

A grid file names a base run config and lists values for config keys; every combination is a
cell, a run of its own in `<output>/<cell name>/`:

    base: run.yaml                   # a run config (relative to this file), or the mapping itself
    grid:
      quant.method: [rtn, gptq]
      quant.bits: [3, 4]
    output: runs/grid                # cells, grid.json and compare/ go here

The grid file and every cell's config are validated before anything runs (UserError, exit 2).
Cells run one after another, each in its own `python -m shardquant quantize` process (memory is
returned between cells; the log is `<cell>/grid.log`). A cell whose report.json exists and holds
the cell's own config is finished and skipped on a rerun; an unfinished one resumes from its
state. A failed cell is recorded in grid.json (exit code, error line) and the rest go on. At
the end `compare` runs over the finished cells into `<output>/compare/`. Torch-free.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shardquant.config import (
    RunConfig,
    _deep_copy,
    _set_dotted,
    build_config,
    config_dict,
    load_yaml,
)
from shardquant.errors import UserError
from shardquant.tools.compare import REPORT, compare, read_report, write_text_atomic

CELL_CONFIG = "grid-cell.yaml"
CELL_LOG = "grid.log"
SUMMARY = "grid.json"
# Keys a grid cannot vary: the grid sets each cell's output, and resuming is automatic.
RESERVED = ("output", "resume")
MAX_CELLS = 10_000


class GridFile(BaseModel):
    """The schema of GRID.yaml."""

    model_config = ConfigDict(extra="forbid")

    base: str | dict[str, Any] = Field(
        description="The run config every cell starts from: a YAML file (relative to the grid file) or the "
        "config mapping itself."
    )
    grid: dict[str, list[Any]] = Field(
        description="Dotted config key -> the values to try, e.g. quant.bits: [3, 4]; every combination is a cell."
    )
    output: str = Field("runs/grid", description="Directory of the cells (one run directory each), grid.json, compare/.")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if not v.strip() or "\x00" in v:
            raise ValueError("must be a directory path")
        return v

    @field_validator("grid")
    @classmethod
    def _lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("lists no key; give at least one key with its values")
        for key, values in v.items():
            if key in RESERVED:
                raise ValueError(f"'{key}' cannot be varied (the grid sets each cell's {key})")
            if not values:
                raise ValueError(f"'{key}' lists no value")
            dumped = [json.dumps(x, sort_keys=True, default=str) for x in values]
            for i, d in enumerate(dumped):
                if d in dumped[:i]:
                    raise ValueError(f"'{key}' lists {values[i]!r} twice")
        return v


@dataclass
class Cell:
    """One combination: its values, name, raw config (what its process reads) and resolved config."""

    name: str
    values: dict[str, Any]
    output: Path
    raw: dict[str, Any]
    config: RunConfig


@dataclass
class Grid:
    """A validated grid file and its cells."""

    path: Path
    output: Path
    cells: list[Cell] = field(default_factory=list)


def _format(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}' (keys: base, grid, output)"
    if first["type"] == "missing":
        return f"missing key '{loc}'"
    return f"{loc}: {msg}"


def _slug(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # -1 stays -1
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, str) and ("/" in value or "\\" in value):
        text = Path(value).name or value  # a path: its last part
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-")[:40] or "x"


def cell_names(keys: list[str], combos: list[tuple[Any, ...]]) -> list[str]:
    """`method-rtn_bits-3` per combination: each key's last part (the full key where two keys
    share it) and the value; names that still collide get a hash of their values."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, keys, strict=True)]
    names = ["_".join(f"{lab}-{_slug(v)}" for lab, v in zip(labels, combo, strict=True)) for combo in combos]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            digest = hashlib.sha1(json.dumps(combos[i], sort_keys=True, default=str).encode()).hexdigest()[:6]
            names[i] = f"{name}-{digest}"
    return names


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
    """Read and validate GRID.yaml and every cell's config; UserError naming the file and cell.

    `overrides` (dotted keys, as on the command line) apply to the base before the grid's values.
    """
    path = Path(path)
    data = load_yaml(path)
    try:
        spec = GridFile.model_validate(data)
    except ValidationError as e:
        raise UserError(f"grid file '{path}': {_format(e)}") from None
    if isinstance(spec.base, str):
        base_path = Path(spec.base) if Path(spec.base).is_absolute() else path.parent / spec.base
        base = load_yaml(base_path)
    else:
        base = spec.base
    for key in overrides or {}:
        if key in RESERVED:
            raise UserError(f"grid: --{key} cannot be overridden (set output in '{path}'; cells resume by themselves)")
        if key in spec.grid:
            raise UserError(f"grid: --{key} is also a grid key in '{path}'; drop one")
    output = Path(spec.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"grid file '{path}': output '{output}' is not a directory")
    keys = list(spec.grid)
    size = math.prod(len(v) for v in spec.grid.values())
    if size > MAX_CELLS:
        raise UserError(f"grid file '{path}': {size} cells is more than {MAX_CELLS}; split the grid")
    combos = list(itertools.product(*spec.grid.values()))
    grid = Grid(path=path, output=output)
    for name, combo in zip(cell_names(keys, combos), combos, strict=True):
        values = dict(zip(keys, combo, strict=True))
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            raw = _deep_copy(base)
            for key, value in {**(overrides or {}), **values}.items():
                _set_dotted(raw, key, _deep_copy(value))
            raw["output"] = str(output / name)
            cfg = build_config(raw)
        except UserError as e:
            raise UserError(f"grid file '{path}': cell {shown}: {e}") from None
        grid.cells.append(Cell(name=name, values=values, output=output / name, raw=raw, config=cfg))
    return grid


def finished(cell: Cell) -> bool:
    """True when the cell's report.json is a complete report of this very config."""
    if not (cell.output / REPORT).is_file():
        return False
    try:
        report = read_report(cell.output)
    except UserError:
        return False
    return report["config"] == config_dict(cell.config)


def error_line(log: str) -> str:
    """The line that says why a run failed: its `shardquant: error:` line, else the last line
    (a traceback's exception)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("shardquant: error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_cell(cell: Cell, python: str = sys.executable) -> dict[str, Any]:
    """Run one cell as `python -m shardquant quantize` in its own process; its result record."""
    cell.output.mkdir(parents=True, exist_ok=True)
    cfg_path = cell.output / CELL_CONFIG
    write_text_atomic(cfg_path, yaml.safe_dump(cell.raw, sort_keys=False))
    log_path = cell.output / CELL_LOG
    t = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([python, "-m", "shardquant", "quantize", str(cfg_path), "--quiet"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the run saves its state on SIGINT: let it
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    seconds = time.perf_counter() - t
    if rc == 0 and finished(cell):
        status, error = "done", None
    else:
        status = "failed"
        error = (error_line(log_path.read_text(errors="replace")) if rc != 0
                 else f"exited 0 but '{cell.output / REPORT}' is missing or not this config's")
    return {"status": status, "exit_code": rc, "error": error, "seconds": seconds, "log": str(log_path)}


def _summary(grid: Grid, records: dict[str, dict[str, Any]], compare_md: str | None) -> dict[str, Any]:
    cells = []
    for c in grid.cells:
        rec = records.get(c.name, {"status": "pending"})
        cells.append({"name": c.name, "values": c.values, "output": str(c.output), **rec})
    return {"grid": str(grid.path), "output": str(grid.output), "cells": cells, "compare": compare_md}


def run_grid(grid: Grid, *, python: str = sys.executable, echo=print) -> dict[str, Any]:
    """Run every unfinished cell, record each in `<output>/grid.json`, then compare the finished
    ones into `<output>/compare/`; return the summary."""
    grid.output.mkdir(parents=True, exist_ok=True)
    summary_path = grid.output / SUMMARY
    records: dict[str, dict[str, Any]] = {}

    def save(compare_md: str | None = None) -> dict[str, Any]:
        summary = _summary(grid, records, compare_md)
        write_text_atomic(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    n = len(grid.cells)
    for i, cell in enumerate(grid.cells, 1):
        if finished(cell):
            records[cell.name] = {"status": "skipped", "exit_code": None, "error": None, "seconds": None,
                                  "log": None}
            echo(f"[{i}/{n}] {cell.name}: finished earlier, skipped")
            continue
        echo(f"[{i}/{n}] {cell.name}: running ({', '.join(f'{k}={v}' for k, v in cell.values.items())})")
        try:
            rec = run_cell(cell, python)
        except KeyboardInterrupt:
            records[cell.name] = {"status": "interrupted", "exit_code": None, "error": "interrupted",
                                  "seconds": None, "log": str(cell.output / CELL_LOG)}
            save()
            raise
        records[cell.name] = rec
        if rec["status"] == "done":
            echo(f"[{i}/{n}] {cell.name}: done in {rec['seconds']:.1f} s")
        else:
            echo(f"[{i}/{n}] {cell.name}: FAILED (exit {rec['exit_code']}): {rec['error']}")
        save()
    ok = [str(c.output) for c in grid.cells if records[c.name]["status"] in ("done", "skipped")]
    compare_md = None
    if ok:
        _, files = compare(ok, grid.output / "compare")
        compare_md = str(files[0])
        echo(f"compare: {compare_md}")
    return save(compare_md)
