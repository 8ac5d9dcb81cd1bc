"""The GPUs users have, by `shardquant plan`: Llama-3.1-405B on 8 workers of 80 GB, Llama-3.1-70B on
4 of 48 GB, Llama-3-8B on one 24 GB card, GPTQ and AWQ w4g128 with 128 × 2048 calibration
tokens at the defaults, each with a margin of at least 10%; every term worked out by hand here.
Also the `auto` choices (tools/fit.py) and the advice when a run does not fit."""

from __future__ import annotations

import pytest

from shardquant.config import build_config
from shardquant.tools.fit import choose, suggest
from shardquant.tools.plan import plan_run

GB = 10**9


def llama(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False}


L405, L70, L8 = llama(16384, 53248, 126, 128), llama(8192, 28672, 80, 64), llama(4096, 14336, 32, 32)


def run(method: str, workers: int, **sections) -> dict:
    cfg = {"model": {"path": "/models/llama"}, "calib": {"path": "calib.txt", "n_samples": 128, "seq_len": 2048},
           "quant": {"method": method, "bits": 4, "group_size": 128}}
    if workers > 1:
        cfg["cluster"] = {"backend": "ray", "workers": workers, "gpus_per_worker": 1}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def by_hand(h: int, i: int, method: str, windows: int, unit: int) -> dict[str, int]:
    """Every block-phase term of one GPU worker (bf16, 8 KV heads of 128, batch 8 × 2048) from
    the architecture alone: what the planner must say. `unit`: the elements (rows · in) of
    the widest solve rank 0 gets."""
    d, kv, tokens = 2, 8 * 128, windows * 2048
    lin = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    terms = {
        "framework": 512 * 2**20,  # CUDA context and allocator slack
        "weights": (sum(o * n for o, n in lin.values()) + 2 * h) * d,
        "activations": tokens * h * d,  # the calibration stream (no evaluation configured)
        # uint8 codes, fp32 scale + int32 zero per group of 128, int32 g_idx
        "solved_codes": sum(o * n + o * (n // 128) * 8 + n * 4 for o, n in lin.values()),
        "fp32_copies": 2 * unit * 4,  # the widest unit in fp32, twice
        # down_proj's input: the running sum of the Hessians, and one more in×in (work / Gram)
        "hessians": 2 * i * i * 4,
        "awq_captures": 0,
        # attention output and down_proj's input of every token, between true-sequential passes
        "stage_cache": tokens * (h + i) * d,
        # GPU sdpa holds no T×T scores: the MLP's gate and up outputs, and the batch produced
        "workspace": 2 * 8 * 2048 * i * d + 8 * 2048 * h * d,
    }
    if method == "awq":
        # AWQ's linears whole, a chunk of 2^24 elements at a time: 8 chunk-sized temporaries, the
        # chunks' codes and their concatenation (half a weight); gate + up unscaled in bf16
        terms["fp32_copies"] = (8 * min(unit, 2**24) + unit // 2) * 4 + 2 * i * h * d
        terms["awq_captures"] = tokens * (i + h) * d  # down_proj's inputs and the consumer's outputs
    return terms


def block_phase(t: dict[str, int]) -> int:
    """A forward batch never coexists with a solve."""
    held = ("framework", "weights", "activations", "solved_codes", "awq_captures", "stage_cache")
    return sum(t[k] for k in held) + max(t["workspace"], t["fp32_copies"] + t["hessians"])


# Rank 0's widest solve (execution.packing: a unit costs rows·in² + in³; a GPTQ linear is split
# into k = ceil(out·in² / (phase cost / workers)) row slices; AWQ's stay whole):
# - 405B on 8: down_proj alone, k = ceil(8·16384 / (16384 + 53248)) = 2, halves of 8192 rows
#   (gate/up: k = ceil(3.25 / 1.0625) = 4 slices of 13312 rows, smaller);
# - 70B on 4: down_proj, k = ceil(4·8192 / (8192 + 28672)) = 1, whole;
# - 8B on 1: every linear whole.
CASES = [  # model, workers, worker memory, windows per worker, rank 0's widest GPTQ unit
    pytest.param(L405, 8, 80 * GB, 16, 8192 * 53248, id="405B-8x80GB"),
    pytest.param(L70, 4, 48 * GB, 32, 8192 * 28672, id="70B-4x48GB"),
    pytest.param(L8, 1, 24 * GB, 128, 4096 * 14336, id="8B-1x24GB"),
]


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize(("raw", "workers", "memory", "windows", "unit"), CASES)
def test_fits_with_a_tenth_to_spare(raw, workers, memory, windows, unit, method):
    cfg = build_config(run(method, workers))
    fit = choose(raw, cfg, device="cuda", budget=memory)
    plan = fit.plan
    assert plan.device == "cuda" and plan.cfg.model.dtype == "bfloat16"  # model.dtype auto on a GPU
    assert plan.calib_windows[0] == windows
    h, i = raw["hidden_size"], raw["intermediate_size"]
    expect = by_hand(h, i, method, windows, i * h if method == "awq" else unit)
    if fit.choices["calib.reuse_stages"] is False:
        expect["stage_cache"] = 0
    for key, value in expect.items():
        assert plan.memory[key] == value, key
    assert plan.memory["block_phase"] == block_phase(expect) == plan.peak
    assert plan.peak <= 0.9 * memory, f"{plan.peak / memory:.2f} of the worker's memory"
    assert fit.choices["cluster.activation_memory"] is None  # nothing needs to spill


def test_the_8b_awq_run_drops_the_stage_cache_only_when_it_must():
    """One 24 GB card, AWQ, 128 windows: 9 GiB of stage cache beside 9 GiB of AWQ captures does
    not fit, so auto turns the cache off; with 80 GB it stays on; without a budget it stays on."""
    cfg = build_config(run("awq", 1))
    full = by_hand(4096, 14336, "awq", 128, 14336 * 4096)
    assert block_phase(full) > 24 * GB  # with the cache: over
    small = choose(L8, cfg, device="cuda", budget=24 * GB)
    assert small.choices["calib.reuse_stages"] is False and small.plan.memory["stage_cache"] == 0
    assert "calib.reuse_stages auto: off" in small.reasons[0]
    assert choose(L8, cfg, device="cuda", budget=80 * GB).choices["calib.reuse_stages"] is True
    assert choose(L8, cfg, device="cuda").choices["calib.reuse_stages"] is True
    # Said explicitly, the user's settings stand (and the plan says it does not fit).
    forced = choose(L8, build_config(run("awq", 1, calib={"reuse_stages": True}, cluster={"activation_memory": None})),
                    device="cuda", budget=24 * GB)
    assert forced.choices == {} and forced.plan.peak > 24 * GB


def test_auto_spills_activations_to_the_cap_that_fits():
    """8B GPTQ on one card with 2048 windows of 2048: 32 GiB of calibration activations; auto
    drops the stage cache, then caps the activations so the peak lands exactly on the budget."""
    cfg = build_config(run("gptq", 1, calib={"n_samples": 2048}))
    budget = 24 * GB
    fit = choose(L8, cfg, device="cuda", budget=budget)
    assert fit.choices["calib.reuse_stages"] is False
    cap = int(fit.choices["cluster.activation_memory"])
    assert fit.plan.resident == cap and fit.plan.spilled == 2048 * 2048 * 4096 * 2 - cap
    assert fit.plan.peak == budget


def test_advice_names_the_smallest_change_that_fits():
    """405B GPTQ with the stage cache kept on 40 GB cards: 42.1 GB a worker, the solve (not the
    forward) the larger phase, so a smaller batch does not help and dropping the stage cache
    (4.56 GB) is the first change that fits. 8B with a forward batch of 64 on an 8 GB card: the
    MLP's outputs (7.5 GB) dominate and half the batch fits. float32 on a GPU is answered with
    bfloat16 first."""
    cfg = build_config(run("gptq", 8, calib={"reuse_stages": True}))
    over = choose(L405, cfg, device="cuda", budget=40 * GB)
    assert over.plan.peak > 40 * GB
    assert suggest(L405, over, device="cuda") == "calib.reuse_stages: false"
    assert plan_run(L405, build_config(run("gptq", 8, calib={"reuse_stages": False})), device="cuda").peak <= 40 * GB
    assert suggest(L405, choose(L405, cfg, device="cuda", budget=80 * GB), device="cuda") is None  # fits
    wide = build_config(run("gptq", 1, calib={"batch_size": 64, "reuse_stages": False},
                            cluster={"activation_memory": None}))
    batch = choose(L8, wide, device="cuda", budget=8 * GB)
    assert batch.plan.peak > 8 * GB and batch.plan.memory["workspace"] == 2 * 64 * 2048 * 14336 * 2 + 64 * 2048 * 4096 * 2
    assert suggest(L8, batch, device="cuda") == "calib.batch_size: 32"
    fp32 = choose(L8, build_config(run("gptq", 1, model={"dtype": "float32"}, calib={"reuse_stages": False},
                                       cluster={"activation_memory": None})), device="cuda", budget=8 * GB)
    assert fp32.plan.peak > 8 * GB
    assert suggest(L8, fp32, device="cuda") == "model.dtype: bfloat16"
