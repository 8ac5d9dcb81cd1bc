"""report.json and report.md: the machine- and person-readable result of a run."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from .shards import write_json_atomic


def peak_rss_bytes() -> int:
    """Peak resident memory of this process and its waited-for children, in bytes (Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


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
        f"{'symmetric' if q['symmetric'] else 'asymmetric'}, act-order {q['act_order']}",
        f"- calibration: {cfg['calib']['n_samples']} × {cfg['calib']['seq_len']} tokens from "
        f"`{cfg['calib']['path']}` (propagate: {cfg['calib']['propagate']})",
        f"- export: {report['export']['format']} → `{report['export']['path']}`",
        "",
        "| | value |",
        "| --- | --- |",
        f"| perplexity fp | {_fmt(ppl['fp'])} |",
        f"| perplexity quantized | {_fmt(ppl['quantized'])} |",
        f"| total time (s) | {_fmt(report['timing']['total_s'], 1)} |",
        f"| calibration time (s) | {_fmt(report['timing']['calibrate_s'], 1)} |",
        f"| peak RSS (GiB) | {report['memory']['peak_rss_bytes'] / 2**30:.2f} |",
        "",
        "## Blocks",
        "",
        "| block | seconds | worker | worst layer | loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in report["blocks"]:
        worst = max(b["loss"].items(), key=lambda kv: kv[1]) if b["loss"] else ("—", None)
        lines.append(f"| {b['index']} | {b['seconds']:.2f} | {b['worker']} | {worst[0]} | {_fmt(worst[1])} |")
    return "\n".join(lines) + "\n"


def write_report(output: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into the run directory (atomically)."""
    write_json_atomic(output / "report.json", report)
    md = output / "report.md"
    tmp = md.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
