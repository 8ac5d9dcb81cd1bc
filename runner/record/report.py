"""report.json and report.md: the machine- and person-readable result of a run."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from shardquant.export.shards import write_json_atomic


def own_peak_rss_bytes() -> int:
    """Peak resident memory of this process alone, in bytes.

    Linux keeps `ru_maxrss` across exec, so a process started by a big parent (a benchmark
    holding a model, a notebook) would report the parent's size; `VmHWM` in /proc/self/status
    is the high-water mark of this program's own memory. Falls back to `ru_maxrss` elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process or of any of its waited-for children, in bytes."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return max(own_peak_rss_bytes(), kids)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def task_table(tasks: dict[str, Any] | None) -> list[str]:
    """report.md's task table (task, metric, fp, quantized) from report.json `eval.tasks`."""
    if not tasks:
        return []
    fp, q = tasks.get("fp") or {}, tasks.get("quantized") or {}
    lines = ["## Tasks (lm-evaluation-harness)", "", "| task | metric | fp | quantized |", "| --- | --- | --- | --- |"]
    for task in sorted(set(fp) | set(q)):
        for metric in sorted(set(fp.get(task, {})) | set(q.get(task, {}))):
            lines.append(f"| {task} | {metric} | {_fmt(fp.get(task, {}).get(metric))} | "
                         f"{_fmt(q.get(task, {}).get(metric))} |")
    return [*lines, ""]


def _shard_note(export: dict[str, Any]) -> str:
    """', N shards (M of them the blocks' state files, not written again)' when known."""
    n = export.get("shards")
    if not n:
        return ""
    adopted = export.get("adopted_shards", 0)
    return f", {n} shards" + (f" ({adopted} of them the blocks' state files, not written again)" if adopted else "")


def render_markdown(report: dict[str, Any]) -> str:
    """A short human summary of report.json."""
    cfg = report["config"]
    q = cfg["quant"]
    ppl = report["ppl"]
    lines = [
        "# shardquant run",
        "",
        f"- model: `{cfg['model']['path']}`",
        f"- method: **{q['method']}**, {q['bits']} bits, group {q['group_size']}, "
        f"{'symmetric' if q['symmetric'] else 'asymmetric'}, act-order {q['act_order']}"
        + (f", scheme {q['scheme']}" + (" (weights only)" if q.get("weights_only") else "") if q.get("scheme") else ""),
        *_activation_lines(q),
        (f"- calibration: {cfg['calib']['n_samples']} × {cfg['calib']['seq_len']} tokens from "
         f"`{cfg['calib']['path']}` (propagate: {cfg['calib']['propagate']})"
         if report.get("calibration", {}).get("windows", 1) else
         "- calibration: none (round to nearest with no static input scale is data-free)"),
        f"- export: {report['export']['format']} → `{report['export']['path']}`" + _shard_note(report["export"]),
        "",
        "| | value |",
        "| --- | --- |",
        f"| perplexity fp | {_fmt(ppl['fp'])} |",
        f"| perplexity quantized | {_fmt(ppl['quantized'])} |",
        f"| total time (s) | {_fmt(report['timing']['total_s'], 1)} |",
        f"| calibration time (s) | {_fmt(report['timing']['calibrate_s'], 1)} |",
        f"| peak RSS (GiB) | {report['memory']['peak_rss_bytes'] / 2**30:.2f} |",
        "",
        *task_table(report.get("eval", {}).get("tasks")),
        "## Blocks",
        "",
        "| block | seconds | worker | worst layer | loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in report["blocks"]:
        worst = max(b["loss"].items(), key=lambda kv: kv[1]) if b["loss"] else ("—", None)
        lines.append(f"| {b['index']} | {b['seconds']:.2f} | {b['worker']} | {worst[0]} | {_fmt(worst[1])} |")
    return "\n".join(lines) + "\n"


def _activation_lines(q: dict[str, Any]) -> list[str]:
    """The report.md line saying how input activations were quantized (none for weight-only)."""
    from shardquant.presets import PRESETS

    p = PRESETS.get(str(q.get("scheme")).upper())
    if p is None or not p.activations or q.get("weights_only"):
        return []
    smooth = f", after SmoothQuant (alpha {q['smoothquant']})" if q.get("smoothquant") else ""
    return [f"- activations: every quantized linear's input is quantized ({p.activations}){smooth}; the quantized "
            "perplexity is measured with it, as the served model computes"]


def write_plots(output: Path, report: dict[str, Any]) -> list[Path]:
    """PNG plots of per-block loss (per layer) and per-block time; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    blocks = report["blocks"]
    if not blocks:
        return []
    idx = [b["index"] for b in blocks]
    written = []
    layers = sorted({k for b in blocks for k in b["loss"]})
    if layers:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for layer in layers:
            ax.plot(idx, [b["loss"].get(layer, float("nan")) for b in blocks], marker=".", label=layer)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("loss")
        ax.set_title("Per-layer loss by block")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, output / "loss.png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(blocks)
    for phase in ("forward_s", "stats_s", "solve_s"):
        vals = [b.get(phase, 0.0) for b in blocks]
        ax.bar(idx, vals, bottom=bottom, label=phase[:-2])
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    ax.plot(idx, [b["seconds"] for b in blocks], color="black", marker=".", label="block total")
    ax.set_xlabel("block")
    ax.set_ylabel("seconds")
    ax.set_title("Time per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, output / "time.png"))
    plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path


def write_report(output: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, the plots and report.md into the run directory (atomically);
    return the files written."""
    write_json_atomic(output / "report.json", report)
    plots = write_plots(output, report)
    md = output / "report.md"
    tmp = md.with_name(".report.md.tmp")
    text = render_markdown(report)
    if plots:
        text += "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    tmp.write_text(text)
    tmp.replace(md)
    return [output / "report.json", md, *plots]
