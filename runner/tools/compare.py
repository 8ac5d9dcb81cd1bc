"""`shardquant compare`: one table (Markdown, CSV) and two plots from the report.json of many runs.

A run is a directory holding report.json (what `shardquant quantize` writes; a W&B sweep's
runs and a grid's cells are such directories). Arguments are run directories, quoted globs
('runs/*') or a directory of runs (a grid's output, a sweep's `SHARDQUANT_SWEEP_DIR`), which
is read like its glob; a W&B run folder (`output/wandb/offline-run-*`) stands for its run. A run named explicitly must have a valid report.json (else UserError);
one found by a glob or in a directory of runs without one (unfinished, failed, not a run) is
skipped with a warning.

Rows are built by pure functions (`read_report`, `row_from_report`, `pareto_front`); task
columns come from whatever numbers report.json holds under `tasks` (or `eval.tasks`), so
they follow the runs, not a fixed list. Torch-free.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from shardquant.errors import UserError

# (column, where in report.json) for the fixed columns, in table order; "config." paths read the
# resolved config. Task columns (data-driven) come after "ppl_quantized".
FIXED: tuple[tuple[str, str], ...] = (
    ("run", ""),
    ("model", "config.model.path"),
    ("method", "config.quant.method"),
    ("scheme", "config.quant.scheme"),
    ("bits", "config.quant.bits"),
    ("group_size", "config.quant.group_size"),
    ("symmetric", "config.quant.symmetric"),
    ("calib_data", "config.calib.path"),
    ("calib_samples", "config.calib.n_samples"),
    ("calib_seq_len", "config.calib.seq_len"),
    ("calib_tokens", "calibration.tokens"),
    ("ppl_fp", "ppl.fp"),
    ("ppl_quantized", "ppl.quantized"),
)
COST: tuple[tuple[str, str], ...] = (
    ("calibrate_s", "timing.calibrate_s"),
    ("total_s", "timing.total_s"),
    ("peak_rss_bytes", "memory.peak_rss_bytes"),
    ("export_format", "export.format"),
    ("checkpoint_bytes", "export.bytes"),
)
# What a report.json must hold to be a run's result.
REQUIRED = ("config.quant.method", "config.quant.bits", "config.quant.group_size", "ppl", "timing.calibrate_s",
            "memory.peak_rss_bytes", "export.format")
# Fields that must be numbers (or null) wherever present: what the table sorts and plots.
NUMBERS = ("config.quant.bits", "config.quant.group_size", "ppl.fp", "ppl.quantized", "timing.calibrate_s",
           "timing.total_s", "memory.peak_rss_bytes", "export.bytes", "calibration.tokens")
REPORT = "report.json"
FILES = ("compare.md", "compare.csv", "quality_vs_bits.png", "quality_vs_cost.png")


_MISSING = object()


def _walk(tree: Any, path: str) -> Any:
    """tree["a"]["b"] for "a.b"; `_MISSING` where any part is missing."""
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _get(tree: Any, path: str) -> Any:
    """tree["a"]["b"] for "a.b"; None where any part is missing."""
    node = _walk(tree, path)
    return None if node is _MISSING else node


def _has(tree: Any, path: str) -> bool:
    return _walk(tree, path) is not _MISSING


def read_report(run: Path) -> dict[str, Any]:
    """The run's report.json, checked; UserError naming the directory when it is not a result."""
    path = run / REPORT
    if not run.is_dir():
        raise UserError(f"compare: '{run}' is not a directory")
    if not path.is_file():
        raise UserError(f"compare: '{run}' holds no {REPORT} (not a finished run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"compare: '{path}' is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"compare: '{path}' does not hold a JSON object")
    missing = [k for k in REQUIRED if not _has(data, k)]
    if missing:
        raise UserError(f"compare: '{path}' lacks '{missing[0]}' (not a shardquant report)")
    for key in NUMBERS:
        v = _get(data, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise UserError(f"compare: '{path}': '{key}' is not a number (got {str(v)[:40]!r})")
    return data


def task_scores(report: dict[str, Any]) -> dict[str, float]:
    """Every number under report["tasks"] (or report["eval"]["tasks"]), flattened to
    `tasks.<a>.<b>` columns, e.g. tasks.quantized.arc_easy.acc."""
    tasks = report.get("tasks")
    if tasks is None:
        tasks = _get(report, "eval.tasks")
    out: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix] = node

    if isinstance(tasks, dict):
        walk(tasks, "tasks")
    return out


def row_from_report(run: str, report: dict[str, Any]) -> dict[str, Any]:
    """One table row: the fixed columns, then the run's task scores, then its cost."""
    row: dict[str, Any] = {"run": run}
    for col, path in FIXED[1:]:
        row[col] = _get(report, path)
    row.update(task_scores(report))
    for col, path in COST:
        row[col] = _get(report, path)
    return row


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: the fixed ones, every task column any row has (sorted), the cost,
    and `pareto`."""
    tasks = sorted({k for r in rows for k in r if k.startswith("tasks.")})
    return [c for c, _ in FIXED] + tasks + [c for c, _ in COST] + ["pareto"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, both coordinates minimized.

    q dominates p when q is no worse in both and better in one; equal points do not dominate
    each other, so both stay. Points with a NaN coordinate are never on the front.
    Example: (1, 5), (2, 3), (3, 4), (4, 1) -> [0, 1, 3]: (3, 4) is worse than (2, 3) in both.
    """
    front = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            continue
        dominated = any(
            (qx <= x and qy <= y) and (qx < x or qy < y)
            for j, (qx, qy) in enumerate(points) if j != i and not (math.isnan(qx) or math.isnan(qy))
        )
        if not dominated:
            front.append(i)
    return front


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set each row's `pareto`: on the front of (calibration seconds, quantized perplexity)."""
    points = [(_num(r["calibrate_s"]), _num(r["ppl_quantized"])) for r in rows]
    front = set(pareto_front(points))
    for i, r in enumerate(rows):
        r["pareto"] = i in front


def _sort_key(r: dict[str, Any]) -> tuple:
    g = r["group_size"]
    return (str(r["method"]), _num(r["bits"]), math.inf if g == -1 else _num(g), r["run"])


def build_rows(runs: Iterable[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows for (name, report) pairs, sorted by method, bits, group (per channel last), name;
    with the Pareto marks."""
    rows = sorted((row_from_report(name, rep) for name, rep in runs), key=_sort_key)
    mark_pareto(rows)
    return rows


def run_dir(path: Path) -> Path:
    """The run directory of `path`: itself, or for a W&B run folder (`output/wandb/offline-run-*`,
    `run-*`) the run's output directory, which holds report.json."""
    if not (path / REPORT).exists() and path.parent.name == "wandb" and (path.parent.parent / REPORT).is_file():
        return path.parent.parent
    return path


def find_runs(args: Sequence[str]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(name, report) for every run the arguments name, and one warning per skipped directory.

    An argument with glob characters is expanded (no match: UserError); a directory without
    report.json whose subdirectories hold some is a directory of runs. Runs found either way
    that lack a valid report are skipped with a warning; a run named explicitly must have one.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    warnings: list[str] = []
    seen: set[str] = set()

    def add(path: Path, *, strict: bool) -> None:
        path = run_dir(path)
        key = os.path.realpath(path)
        if key in seen or (not strict and (path / FILES[1]).is_file()):  # a compare output is no run
            return
        seen.add(key)
        try:
            report = read_report(path)
        except UserError as e:
            if strict:
                raise
            warnings.append(f"skipped: {str(e).removeprefix('compare: ')}")
            return
        found.append((str(path), report))

    for arg in args:
        if glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise UserError(f"compare: '{arg}' matches nothing")
            for m in matches:
                if Path(m).is_dir():
                    add(Path(m), strict=False)
            continue
        path = Path(arg)
        if path.is_dir() and not (path / REPORT).exists() and any(path.glob(f"*/{REPORT}")):
            for sub in sorted(p for p in path.iterdir() if p.is_dir()):
                add(sub, strict=False)
            continue
        add(path, strict=True)
    if not found:
        raise UserError(f"compare: no finished run among {', '.join(repr(a) for a in args)}")
    return found, warnings


def _cell(v: Any) -> str:
    """A CSV cell: numbers exactly as in report.json (repr round-trips floats), empty for none."""
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The table as CSV, every column, raw values."""
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


def _size(v: Any) -> str:
    """Bytes as a person reads them: 206.4 KiB, 1.25 GiB."""
    if v is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{v} B"


def _f(v: Any, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table for a person: scheme as `W4 g128 sym`, sizes in MiB/GiB, * on the Pareto front."""
    tasks = [c for c in columns(rows) if c.startswith("tasks.")]
    head = ["run", "method", "scheme", "group", "calibration", "ppl fp", "ppl quantized", *tasks,
            "calib s", "peak RSS", "checkpoint", "pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        scheme = f"W{r['bits']} {'sym' if r['symmetric'] else 'asym'}" if r["symmetric"] is not None else f"W{r['bits']}"
        if r.get("scheme"):
            scheme = f"{r['scheme']} ({scheme})"
        group = "channel" if r["group_size"] == -1 else str(r["group_size"])
        calib = f"`{r['calib_data']}` {r['calib_samples']} × {r['calib_seq_len']}" if r["calib_data"] else "—"
        if r.get("calib_tokens") == 0:
            calib = "none (data-free)"
        cells = [f"`{r['run']}`", str(r["method"]), scheme, group, calib, _f(r["ppl_fp"], 3),
                 _f(r["ppl_quantized"], 3), *(_f(r.get(t), 4) for t in tasks), _f(r["calibrate_s"], 2),
                 _size(r["peak_rss_bytes"]), _size(r["checkpoint_bytes"]), "*" if r["pareto"] else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temp name in the same directory, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _label(r: dict[str, Any]) -> str:
    return f"{r['method']} {'per-channel' if r['group_size'] == -1 else 'g' + str(r['group_size'])}"


MARKERS = "osD^vP*X"


def _style(r: dict[str, Any], methods: list[str]) -> dict[str, str]:
    """A marker per method, a solid line for grouped scales and a dashed one per channel."""
    return {"marker": MARKERS[methods.index(r["method"]) % len(MARKERS)],
            "linestyle": "--" if r["group_size"] == -1 else "-"}


def _point_label(r: dict[str, Any]) -> str:
    return f"{r['method']} W{r['bits']} {'ch' if r['group_size'] == -1 else 'g' + str(r['group_size'])}"


def write_plots(output: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """quality_vs_bits.png (quantized perplexity against bits, a line per method and group) and
    quality_vs_cost.png (against calibration seconds, the Pareto front marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not math.isnan(_num(r["ppl_quantized"]))]
    fps = sorted({round(r["ppl_fp"], 6) for r in rows if r["ppl_fp"] is not None})
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in measured:
        series.setdefault(_label(r), []).append(r)
    methods = sorted({r["method"] for r in measured})
    for label, pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["bits"])
        style = _style(pts[0], methods)
        # each method a little to the side of the tick, so series with close values stay visible
        dodge = 0.03 * (methods.index(pts[0]["method"]) - (len(methods) - 1) / 2)
        ax.plot([r["bits"] + dodge for r in pts], [r["ppl_quantized"] for r in pts], label=label,
                marker=style["marker"], linestyle=style["linestyle"], mfc="none")
    if len(fps) == 1:
        ax.axhline(fps[0], color="gray", linestyle="--", label="fp")
    _log_if_wide(ax, measured)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("perplexity (quantized)")
    ax.set_title("Quality against bits")
    if measured:
        ax.set_xticks(sorted({r["bits"] for r in measured}))
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, output / "quality_vs_bits.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        ax.scatter([r["calibrate_s"] for r in pts], [r["ppl_quantized"] for r in pts], label=label, zorder=2,
                   marker=_style(pts[0], methods)["marker"])
    front = sorted((r for r in measured if r["pareto"]), key=lambda r: _num(r["calibrate_s"]))
    if front:
        ax.step([r["calibrate_s"] for r in front], [r["ppl_quantized"] for r in front], where="post",
                color="black", linewidth=1, zorder=1)
        ax.scatter([r["calibrate_s"] for r in front], [r["ppl_quantized"] for r in front], s=160,
                   facecolors="none", edgecolors="black", label="Pareto front", zorder=3)
        for r in front:
            ax.annotate(_point_label(r), (r["calibrate_s"], r["ppl_quantized"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=7)
    if len(fps) == 1:
        ax.axhline(fps[0], color="gray", linestyle="--", label="fp")
    _log_if_wide(ax, measured)
    ax.set_xlabel("calibration seconds")
    ax.set_ylabel("perplexity (quantized)")
    ax.set_title("Quality against calibration cost")
    if measured:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, output / "quality_vs_cost.png"))
    plt.close(fig)
    return written


def _log_if_wide(ax, rows: Sequence[dict[str, Any]]) -> None:
    """A log perplexity axis when the values span more than 10x (2-bit runs next to 8-bit ones)."""
    ys = [r["ppl_quantized"] for r in rows if r["ppl_quantized"] > 0]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def compare(args: Sequence[str], output: Path, *, warn=None) -> tuple[list[dict[str, Any]], list[Path]]:
    """Read the runs, write compare.md, compare.csv and the two plots into `output`; return
    the rows and the files written. Warnings (skipped directories) go to `warn` (stderr)."""
    found, warnings = find_runs(args)
    for w in warnings:
        (warn or (lambda m: print(f"shardquant: {m}", file=sys.stderr)))(w)
    rows = build_rows(found)
    if output.exists() and not output.is_dir():
        raise UserError(f"compare: --output '{output}' is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    md, csv_path = output / "compare.md", output / "compare.csv"
    write_text_atomic(csv_path, to_csv(rows))
    plots = write_plots(output, rows)
    text = "# shardquant compare\n\n" + to_markdown(rows)
    text += "\n`*`: on the Pareto front of calibration seconds against quantized perplexity.\n\n"
    text += "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    write_text_atomic(md, text)
    return rows, [md, csv_path, *plots]
