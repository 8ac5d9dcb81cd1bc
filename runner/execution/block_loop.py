"""Walking the blocks: one after another (data parallel), or as pipeline stages.

`run_blocks` calibrates every unfinished block on an executor, records each finished block
in progress.json (so a rerun resumes after it) and hands its report record to the caller.
A lost Ray worker is replaced and the unfinished work redone, with the fault recorded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from shardquant.calib.steps import BlockProfile, calibrate_block
from shardquant.record.state import RunState

if TYPE_CHECKING:
    from shardquant.pipeline import Prepared

Record = Callable[[dict[str, Any]], None]
T = TypeVar("T")


def setup(ex, p: Prepared, do_fp: bool) -> None:
    """Embed the run's windows (and its eval.tasks sequences) on the executor's workers."""
    if p.tasks is None:
        ex.setup(p.calib, p.evals, do_fp_eval=do_fp)
    else:
        ex.setup(p.calib, p.evals, do_fp_eval=do_fp, tasks=p.tasks.sequences)


def run_blocks(ex, p: Prepared, state: RunState, progress: dict[str, Any], *, start: int, staged: bool,
               do_fp: bool, on_record: Record) -> float | None:
    """Calibrate blocks `start`.. (stage mode: every block not in progress `stage_done`) on
    `ex`, whose `setup` has run. `on_record` gets each finished block's report record (again
    for a block redone after a lost worker). Data parallel, a block is committed to
    progress.json once its state file and the activations after it are on disk, both written
    while the next block calibrates.
    Returns the stage mode's fp streaming seconds (None when data parallel)."""
    if staged:
        return _stages_with_recovery(ex, p, state, progress, do_fp, on_record)
    n, i = p.source.num_blocks, start
    pending: tuple[int, dict[str, Any]] | None = None  # (done, record): its files being written
    while i < n or pending is not None:
        try:
            if i < n:
                rec = _run_block(ex, p, i, state)
            if pending is not None:
                _commit(ex, state, progress, *pending)
                pending = None
            if i == n:
                break
            # The next block calibrates while the activations after this one are written.
            ex.begin_save_activations([str(state.acts_file(i + 1, k)) for k in range(ex.world)])
            pending = (i + 1, rec)
        except Exception as e:  # a lost Ray worker: replace it, redo from the last saved block
            t_fault = time.perf_counter()
            pending = None
            if not ex.recover(e):
                raise
            i = progress["done"]
            if i:
                ex.load_activations([str(state.dir / a["file"]) for a in progress["activations"]])
            else:
                setup(ex, p, do_fp)
            _record_fault(progress, e, i, t_fault, f"redoing from block {i}")
            continue
        on_record(rec)
        i += 1
    return None


def _stages_with_recovery(ex, p: Prepared, state: RunState, progress: dict[str, Any], do_fp: bool,
                          on_record: Record) -> float:
    fresh = True
    while True:
        try:
            if not fresh:  # stage 0 starts again from the embedded windows
                setup(ex, p, do_fp)
            fresh = False
            return _run_stages(ex, p, state, progress, on_record)
        except Exception as e:  # a lost Ray worker: replace it, redo the unfinished blocks
            t_fault = time.perf_counter()
            if not ex.recover(e):
                raise
            _record_fault(progress, e, progress["done"], t_fault, "redoing the unfinished blocks")


def put_record(records: list[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Replace the record of the block with `record`'s index in place, else append it; True
    when one was replaced (a block redone after a lost worker)."""
    for k, old in enumerate(records):
        if old["index"] == record["index"]:
            records[k] = record
            return True
    records.append(record)
    return False


PHASES = ("load_s", "forward_s", "stats_s", "solve_s", "search_s", "eval_s", "export_s")
SPILL_SUMS = ("written_bytes", "read_bytes", "write_s", "read_s", "wait_s")


def spill_summary(blocks: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """report.json `spill`: the backend (`cluster.spill` as the workers resolved it; `mode`
    when no block says), bytes written to and read from the spill files over all blocks and
    workers, the seconds the I/O threads spent, their throughput (bytes per second of I/O
    thread time, null when nothing moved) and the seconds the compute waited for spilled data."""
    parts = [b["spill"] for b in blocks if "spill" in b]
    modes = sorted({m for p in parts for m in p["mode"].split(",")})
    out: dict[str, Any] = {"mode": ",".join(modes) or mode,
                           **{k: sum(p[k] for p in parts) for k in SPILL_SUMS}}
    out["write_bytes_per_s"] = out["written_bytes"] / out["write_s"] if out["write_s"] > 0 else None
    out["read_bytes_per_s"] = out["read_bytes"] / out["read_s"] if out["read_s"] > 0 else None
    return out


def merge_kernels(tallies: Iterable[dict[str, str]]) -> dict[str, str]:
    """One tally of which implementation each kernel ran with (`kernels.select.take_ran`) from
    several: ``triton``, ``torch``, or ``torch+triton`` where both ran."""
    seen: dict[str, set[str]] = {}
    for t in tallies:
        for k, v in t.items():
            seen.setdefault(k, set()).update(v.split("+"))
    return {k: "+".join(sorted(v)) for k, v in sorted(seen.items())}


def block_record(index: int, seconds: float, losses: dict[str, float], prof: BlockProfile,
                  parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One report.json `blocks[]` entry; phase times are the slowest worker's."""
    rec: dict[str, Any] = {
        "index": index, "seconds": seconds, "worker": ",".join(p["worker"] for p in parts), "loss": losses,
    }
    for key in PHASES:
        rec[key] = max((p.get(key, 0.0) for p in parts), default=0.0)
    # Wall time no phase accounts for: waiting on other workers, transfers, the driver's steps.
    rec["idle_s"] = max(0.0, seconds - sum(rec[k] for k in PHASES))
    rec["activation_bytes"] = sum(p.get("activation_bytes", 0) for p in parts)
    rec["stage_cache_bytes"] = sum(p.get("stage_cache_bytes", 0) for p in parts)
    rec["peak_rss_bytes"] = max((p.get("peak_rss_bytes", 0) for p in parts), default=0)
    kernels = merge_kernels(p.get("kernels", {}) for p in parts)
    if kernels:
        rec["kernels"] = kernels
    spills = [p["spill"] for p in parts if "spill" in p]
    if spills:  # summed over the workers (`ActivationStore.stats`: what moved during this block)
        rec["spill"] = {"mode": ",".join(sorted({s["mode"] for s in spills})),
                        **{k: sum(s[k] for s in spills) for k in SPILL_SUMS}}
    if prof.awq:
        rec["awq"] = prof.awq
    if prof.experts:
        rec["experts"] = prof.experts
    if prof.notes:
        rec["notes"] = prof.notes
    return rec


def _run_block(ex, p: Prepared, i: int, state: RunState) -> dict[str, Any]:
    """Every step of block i on the executor; its tensors are being written to the block's
    state file (`_commit` waits for it). Returns the block's report record."""
    src, q = p.source, p.cfg.quant
    name = f"{src.adapter.blocks}.{i}"
    t0 = time.perf_counter()
    ex.begin_block(i)
    prof = BlockProfile()
    losses = calibrate_block(ex, name, src.skeleton.get_submodule(name), src.adapter, q, prof)
    parts = ex.end_block(str(state.block_file(i)))
    return block_record(i, time.perf_counter() - t0, losses, prof, parts)


def _commit(ex, state: RunState, progress: dict[str, Any], done: int, record: dict[str, Any]) -> None:
    """Record blocks < done as finished once block done - 1's state file and the activations
    after it are on disk: wait for the writes `end_block` and `begin_save_activations`
    started, then progress.json (with their checksums and the block's report record) and the
    pruning of older checkpoints."""
    block_file = state.block_file(done - 1)
    block_digest = ex.block_file_digest(str(block_file))
    paths = [state.acts_file(done, k) for k in range(ex.world)]
    digests = ex.end_save_activations()
    progress["activations"] = [{"file": state.rel(x), "sha256": d} for x, d in zip(paths, digests, strict=True)]
    progress["files"][state.rel(block_file)] = block_digest
    progress["done"] = done
    put_record(progress["blocks"], record)
    state.write(progress)
    state.prune_activations([a["file"] for a in progress["activations"]])


def retry_lost(ex, progress: dict[str, Any], step: Callable[[], T], restore: Callable[[], None], redo: str) -> T:
    """`step()`, again after `restore()` each time a lost worker was replaced (the work after
    the blocks: evaluation, export), with the fault recorded like the blocks' ones."""
    while True:
        try:
            return step()
        except Exception as e:
            t_fault = time.perf_counter()
            if not ex.recover(e):
                raise
            _record_fault(progress, e, progress["done"], t_fault, redo)
            restore()


def _record_fault(progress: dict[str, Any], error: BaseException, block: int, t_fault: float, redo: str) -> None:
    """A lost worker that was replaced: in progress.json (report.json `cluster.faults`) and on stderr."""
    progress["faults"].append({
        "block": block, "error": str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
        "recovery_s": time.perf_counter() - t_fault,
    })
    print(f"shardquant: worker lost ({type(error).__name__}); replaced, {redo}", file=sys.stderr)


def _run_stages(ex, p: Prepared, state: RunState, progress: dict[str, Any], on_record: Record) -> float:
    """Every block through pipeline stages (see cluster/stage_executor.py); each finished block
    is recorded in progress.json as it arrives. Returns the fp streaming pass's seconds."""
    done = set(progress.setdefault("stage_done", []))
    evaluating = p.evals is not None

    def on_block(res: dict[str, Any]) -> None:
        i = res["index"]
        rec = block_record(i, res["seconds"], res["losses"], res["profile"], [res["part"]])
        rec["start"], rec["end"] = res["start"], res["end"]
        progress["files"][state.rel(state.block_file(i))] = res["block_sha256"]  # the writer's
        if evaluating:
            progress["files"][state.rel(state.qblock_file(i))] = res["qblock_sha256"]
        done.add(i)
        progress["stage_done"] = sorted(done)
        while progress["done"] in done:
            progress["done"] += 1
        put_record(progress["blocks"], rec)
        state.write(progress)
        on_record(rec)

    return ex.run(lambda i: str(state.block_file(i)), (lambda i: str(state.qblock_file(i))) if evaluating else None,
                  set(done), on_block)


def stage_overlap(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """From block records with start/end times and a worker: the share of the calibration
    wall time during which at least two stages were busy, and each stage's busy share."""
    timed = [b for b in blocks if "start" in b]
    if not timed:
        return {}
    t0, t1 = min(b["start"] for b in timed), max(b["end"] for b in timed)
    span = max(t1 - t0, 1e-9)
    events = sorted([(b["start"], 1) for b in timed] + [(b["end"], -1) for b in timed])
    both, busy, last = 0.0, 0, t0
    for t, step in events:
        if busy >= 2:
            both += t - last
        busy, last = busy + step, t
    per: dict[str, float] = {}
    for b in timed:
        per[b["worker"]] = per.get(b["worker"], 0.0) + (b["end"] - b["start"]) / span
    return {"wall_s": span, "two_or_more_busy": both / span, "busy": per}
