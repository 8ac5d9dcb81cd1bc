"""`shardquant plan` as text for a person (the numbers are `shardquant.tools.plan`'s)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardquant.config import parse_size
from shardquant.errors import UserError

if TYPE_CHECKING:
    from shardquant.tools.plan import Plan


def human(n: int | float) -> str:
    """Bytes as GiB/MiB/KiB/B with two decimals (negative allowed)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def _share(windows: list[int]) -> str:
    counts: dict[int, int] = {}
    for w in windows:
        counts[w] = counts.get(w, 0) + 1
    return ", ".join(f"{n} on {k} worker{'s' if k > 1 else ''}" for n, k in sorted(counts.items(), reverse=True))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def render(plan: Plan, capacity: int | None = None, throughput: int | None = None) -> str:
    """The plan as text for a person (spill time at `throughput` bytes/s, None: the default)."""
    s, c, m = plan.shape, plan.cfg, plan.memory
    q = c.quant
    scheme = "none" if q.method == "none" else f"{q.method} {q.bits}-bit group {q.group_size}"
    if q.method != "none" and q.scheme is not None:
        inputs = f", inputs {q.activations}" if q.activations else ""
        smooth = f", SmoothQuant {q.smoothquant}" if q.smoothquant is not None else ""
        scheme += f" ({q.scheme}{', weights only' if q.weights_only else ''}{inputs}{smooth})"
    lines = [
        f"model      {plan.model_path}: {s.family}, {s.layers} blocks, hidden {s.hidden}, intermediate "
        f"{s.intermediate}, {s.heads} heads / {s.kv_heads} kv heads (head_dim {s.head_dim}), vocab {s.vocab}"
        f"{', tied embeddings' if s.tied else ''}",
        f"run        {scheme}, {c.model.dtype} on {plan.device}, export {c.export.format}, propagate {c.calib.propagate}, "
        f"{plan.world} {c.cluster.backend} worker{'s' if plan.world > 1 else ''}",
        "",
        "per worker (rank 0, the largest share)",
        f"  calibration windows  {plan.calib_windows[0]} of {sum(plan.calib_windows)} × {c.calib.seq_len} tokens"
        f" ({_share(plan.calib_windows)})",
        f"  evaluation windows   {plan.eval_windows[0]} of {sum(plan.eval_windows)} × {c.eval.seq_len} tokens"
        f" ({_share(plan.eval_windows)})",
    ]
    for name, n in plan.streams.items():
        lines.append(f"  activations {name:<9}{human(n):>12}  ({n} B)")
    act = f"  activations total    {human(plan.activation_bytes):>12}"
    if plan.spilled:
        act += f"  ({human(plan.resident)} in memory, {human(plan.spilled)} spilled to disk)"
    lines.append(act)
    spill = plan.spill_json(throughput)
    if spill:
        lines.append(
            f"  spill traffic        {human(spill['block_read_bytes'] + spill['block_written_bytes']):>12}  per block "
            f"(read {human(spill['block_read_bytes'])}, written {human(spill['block_written_bytes'])}); "
            f"{human(spill['run_read_bytes'] + spill['run_written_bytes'])} per run: {_duration(spill['seconds'])} "
            f"at {spill['throughput_bytes_per_s'] / 1e9:.2f} GB/s (cluster.spill {spill['mode']}; without overlap, "
            "the upper bound of what it adds)"
        )
    lines.append(f"  block weights        {human(plan.block_bytes):>12}  ({c.model.dtype})")
    if plan.hessian_group is not None:
        lines.append(f"  largest Hessian      {human(plan.hessian_bytes):>12}  ({plan.hessian_group}: "
                     f"{plan.hessian_in}×{plan.hessian_in} fp32)")
    elif q.method != "none":
        lines.append(f"  largest Hessian      {'none':>12}  ({q.method} needs none)")
    if m["awq_captures"]:
        lines.append(f"  AWQ captures         {human(m['awq_captures']):>12}")
    lines.append("")
    lines.append("peak memory per worker (estimate)")
    for key in ("framework", "weights", "activations", "solved_codes", "awq_captures", "stage_cache",
                "block_writing"):
        if m[key]:
            lines.append(f"  {key:<20}{human(m[key]):>12}")
    solve = m["fp32_copies"] + m["hessians"]
    lines.append(f"  + the larger of the forward's workspace {human(m['workspace'])} and the solve's "
                 f"{human(solve)} (fp32 copies {human(m['fp32_copies'])}, hessians {human(m['hessians'])})")
    lines.append(f"  = block phase        {human(m['block_phase']):>12}")
    lines.append(f"  outside the blocks   {human(m['outside_phase']):>12}")
    if len(set(plan.worker_peaks)) > 1:
        ranks = ", ".join(f"{r}: {human(p)}" for r, p in enumerate(plan.worker_peaks))
        lines.append(f"  by rank (who solves what differs)  {ranks}")
    lines.append(f"  peak                 {human(m['peak']):>12}  ({m['peak']} B)")
    if plan.driver is not None:
        lines.append(f"  driver process       {human(plan.driver):>12}  (host RSS; holds no weights)")
    lines.append("")
    lines.append(f"checkpoint {human(plan.checkpoint_bytes)} ({plan.checkpoint_bytes} B of tensors, {c.export.format})")
    if capacity is not None:
        v = plan.verdict(capacity)
        mem = f"worker memory {human(capacity)} ({capacity} B)"
        if v["fits"]:
            lines.append(f"{mem}: FITS, margin {human(v['margin'])} ({v['margin']} B)")
        else:
            lines.append(f"{mem}: DOES NOT FIT, short by {human(-v['margin'])} ({-v['margin']} B)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def parse_throughput(text: str) -> int:
    """`--disk-throughput` ('2GB', '500MB', '3GiB', bytes; per second) as bytes per second."""
    try:
        return parse_size(text.removesuffix("/s"))
    except ValueError as e:
        raise UserError(f"--disk-throughput: {e}") from None


def parse_capacity(text: str) -> int:
    """`--worker-memory` ('80GB', '96GiB', bytes) as bytes; UserError when malformed."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise UserError(f"--worker-memory: {e}") from None
