"""Fitting a run into its workers' memory: the `auto` settings, and what to change when it does not fit.

`choose` resolves `quant.moe_experts_per_pass: auto`, `calib.reuse_stages: auto` and
`cluster.activation_memory: auto` against a per-worker budget (`cluster.worker_memory`, `plan
--worker-memory`, or a local GPU's memory): everything stays on while the plan fits; otherwise
a mixture-of-experts block's experts are observed in passes of as many as fit (a multiple of
the workers, so each pass's solves spread evenly; it costs one more router pass each), then
the stage cache goes (it is the largest term that only buys speed; the experts per pass are
chosen again without it), then activations spill to disk, capped at what fits.
Neither is ever chosen so that the run cannot fit. `suggest` names the smallest single change
that makes a plan that still does not fit fit: more workers, fewer calibration windows per
worker, a smaller forward batch, fewer experts per pass, spilling, or the dtype. No torch: the numbers are
`tools.plan`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardquant.config import RunConfig
from shardquant.tools.plan import Plan, activation_cap, plan_run


@dataclass
class Fit:
    """The plan with the auto settings chosen, and what was chosen and why."""

    plan: Plan
    cfg: RunConfig  # the config with `auto` replaced by the choice
    budget: int | None
    choices: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    refused: str | None = None  # why the run may not start (cluster.spill none over the cap)

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, **self.choices, "reasons": list(self.reasons)}


# quant.moe_experts_per_pass auto aims at this share of the budget (then at all of it).
PASS_HEADROOM = 0.9


def _with(cfg: RunConfig, section: str, **values: Any) -> RunConfig:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def choose(raw: dict[str, Any], cfg: RunConfig, *, device: str | None = None, budget: int | None = None) -> Fit:
    """Resolve the `auto` settings of `cfg` for workers of `budget` bytes (None: keep them on)."""
    reuse_auto = cfg.calib.reuse_stages == "auto"
    spill_auto = cfg.cluster.activation_memory == "auto"
    per_pass_auto = cfg.quant.moe_experts_per_pass == "auto"
    out = cfg
    if reuse_auto:
        out = _with(out, "calib", reuse_stages=True)
    if spill_auto:
        out = _with(out, "cluster", activation_memory=None)
    plan = plan_run(raw, out, device=device)
    fit = Fit(plan, out, budget)
    split = per_pass_auto and plan.shape.experts > 1 and out.quant.true_sequential and out.quant.method != "rtn"
    if budget is not None and plan.peak > budget and split:
        out, plan = _experts_per_pass(raw, out, plan, device, budget, fit.reasons)
    if budget is not None and plan.peak > budget and reuse_auto and plan.memory["stage_cache"]:
        off = plan_run(raw, _with(out, "calib", reuse_stages=False), device=device)
        fit.reasons.append(
            f"calib.reuse_stages auto: off, the stage cache ({plan.memory['stage_cache']} B) would take the "
            f"peak to {plan.peak} B, over the budget of {budget} B"
        )
        out, plan = off.cfg, off
        if split:
            out, plan = _experts_per_pass(raw, _with(out, "quant", moe_experts_per_pass="auto"), plan, device,
                                          budget, fit.reasons)
    never = cfg.cluster.spill == "none"
    if budget is not None and plan.peak > budget and spill_auto and never:
        fit.reasons.append("cluster.activation_memory auto: no cap, cluster.spill is none (activations never spill)")
    if budget is not None and plan.peak > budget and spill_auto and plan.resident and not never:
        others = max(plan.memory["block_phase"], plan.memory["outside_phase"]) - plan.resident
        cap = budget - others
        if cap > 0:
            out = _with(out, "cluster", activation_memory=str(cap))
            plan = plan_run(raw, out, device=device)
            fit.reasons.append(
                f"cluster.activation_memory auto: {cap} B in memory, {plan.spilled} B of activations spilled "
                "to disk (cluster.spill_dir)"
            )
    fit.plan, fit.cfg = plan, out
    if per_pass_auto and plan.shape.experts:
        fit.choices["quant.moe_experts_per_pass"] = out.quant.moe_experts_per_pass
    if never and plan.spilled:  # the run refuses (`pipeline.fit_run`); plan prints it as a note
        fit.refused = (
            f"cluster.spill none: the activations per worker ({plan.activation_bytes} B) exceed "
            f"cluster.activation_memory ({activation_cap(out)} B); raise it, or let them spill (cluster.spill: auto)"
        )
        plan.notes.append(fit.refused)
    if reuse_auto:
        fit.choices["calib.reuse_stages"] = out.calib.reuse_stages
    if spill_auto:
        fit.choices["cluster.activation_memory"] = out.cluster.activation_memory
    return fit


def _experts_per_pass(
    raw: dict[str, Any], cfg: RunConfig, plan: Plan, device: str | None, budget: int, reasons: list[str]
) -> tuple[RunConfig, Plan]:
    """The most routed experts per pass whose plan fits `PASS_HEADROOM` of `budget` (else all
    of it; 1 when none fits): a multiple of the workers, so every worker solves as many of a
    pass's experts, unless not even that many fit. The config and plan with it."""
    experts, world = plan.shape.experts, plan.world

    def trial(n: int) -> tuple[RunConfig, Plan]:
        c = _with(cfg, "quant", moe_experts_per_pass=n)
        return c, plan_run(raw, c, device=device)

    def most(candidates: list[int], limit: float) -> tuple[RunConfig, Plan] | None:
        """The largest candidate within `limit` (the peak grows with the experts per pass)."""
        lo, hi, best = 0, len(candidates) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            got = trial(candidates[mid])
            if got[1].peak <= limit:
                best, lo = got, mid + 1
            else:
                hi = mid - 1
        return best

    even = list(range(world, experts, world))  # world 1: every count
    rest = list(range(1, min(world, experts)))
    best = None
    for limit in (PASS_HEADROOM * budget, budget):  # a pass costs a router run: keep the plan's margin of error
        best = most(even, limit) or most(rest, limit)
        if best is not None:
            break
    best = best or trial(1)
    reasons.append(
        f"quant.moe_experts_per_pass auto: {best[0].quant.moe_experts_per_pass} of {experts} experts per pass, all "
        f"at once would take the peak to {plan.peak} B, over the budget of {budget} B"
    )
    return best


def suggest(raw: dict[str, Any], fit: Fit, *, device: str | None = None) -> str | None:
    """For a plan over its budget: the first single change, in order of how little it costs
    the user, whose plan fits (None when none does, or it fits already)."""
    budget, cfg = fit.budget, fit.cfg
    if budget is None or fit.plan.peak <= budget:
        return None
    tries: list[tuple[str, RunConfig]] = []
    if cfg.model.dtype in ("auto", "float32") and fit.plan.cfg.model.dtype == "float32":
        tries.append(("model.dtype: bfloat16", _with(cfg, "model", dtype="bfloat16")))
    if cfg.calib.batch_size > 1:
        for b in (cfg.calib.batch_size // 2, cfg.calib.batch_size // 4, 1):
            if b >= 1:
                tries.append((f"calib.batch_size: {b}", _with(cfg, "calib", batch_size=b)))
    per_pass = cfg.quant.moe_experts_per_pass
    if isinstance(per_pass, int) and per_pass > 1:  # auto has chosen already
        for n in sorted({per_pass // 2, per_pass // 4, fit.plan.world, 1}, reverse=True):
            if 1 <= n < per_pass:
                tries.append((f"quant.moe_experts_per_pass: {n}", _with(cfg, "quant", moe_experts_per_pass=n)))
    if cfg.calib.reuse_stages is not False:
        tries.append(("calib.reuse_stages: false", _with(cfg, "calib", reuse_stages=False)))
    if fit.plan.resident:
        others = max(fit.plan.memory["block_phase"], fit.plan.memory["outside_phase"]) - fit.plan.resident
        if budget - others > 0:
            tries.append((f"cluster.activation_memory: {budget - others} (spill the rest to disk)",
                          _with(cfg, "cluster", activation_memory=str(budget - others))))
    if cfg.cluster.backend != "local":
        for workers in range(cfg.cluster.workers + 1, 4 * cfg.cluster.workers + 1):
            tries.append((f"cluster.workers: {workers}", _with(cfg, "cluster", workers=workers)))
    for change, trial in tries:
        if plan_run(raw, trial, device=device).peak <= budget:
            return change
    return None
