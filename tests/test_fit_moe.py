"""Mixture-of-experts models on the GPUs users have, by `shardquant plan` (GPTQ w4g128, 128 ×
2048 calibration tokens, bf16 GPU workers, the defaults), each with at least 10% to spare, every
term worked out by hand here as in tests/test_fit.py:

- Qwen3-235B-A22B on 8 workers of 80 GB and Mixtral-8x22B on 4 of 80 GB: every expert in one pass;
- DeepSeek-V3 on 8 of 141 GB (one pass) and on 16 of 80 GB, where `quant.moe_experts_per_pass:
  auto` observes the experts in passes of as many as fit;
- dense layers of a MoE model (`mlp_only_layers`, `decoder_sparse_step`) sized as dense.

The configs are the public config.json values (the keys the plan reads)."""

from __future__ import annotations

from shardquant.config import build_config
from shardquant.tools.fit import choose
from shardquant.tools.plan import plan_run

GB = 10**9
MIB = 2**20

QWEN3_235B_A22B = {
    "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False,
}
MIXTRAL_8X22B = {
    "model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
    "num_attention_heads": 48, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
    "vocab_size": 32768, "tie_word_embeddings": False,
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "n_group": 8, "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False,
}


def run(workers: int, **quant) -> dict:
    return {"model": {"path": "/models/moe"}, "calib": {"path": "calib.txt", "n_samples": 128, "seq_len": 2048},
            "quant": {"method": "gptq", "bits": 4, "group_size": 128, **quant},
            "cluster": {"backend": "ray", "workers": workers, "gpus_per_worker": 1}}


def codes(lins: list[tuple[int, int]]) -> int:
    """Solved weights kept until the block is written: uint8 codes, fp32 scale + int32 zero per
    group of 128, int32 g_idx."""
    return sum(o * i + o * (i // 128) * 8 + i * 4 for o, i in lins)


def block_phase(t: dict[str, int]) -> int:
    held = ("framework", "weights", "activations", "solved_codes", "awq_captures", "stage_cache")
    return sum(t[k] for k in held) + max(t["workspace"], t["fp32_copies"] + t["hessians"])


def check(plan, expect: dict[str, int], memory: int) -> None:
    for key, value in expect.items():
        assert plan.memory[key] == value, key
    assert plan.memory["block_phase"] == block_phase(expect) == plan.peak
    assert plan.peak <= 0.9 * memory, f"{plan.peak / memory:.2f} of the worker's memory"


def test_qwen3_235b_a22b_on_8_workers_of_80gb():
    """94 sparse blocks of 128 experts (gate/up 1536×4096, down 4096×1536), attention q 8192×4096,
    k/v 512×4096, o 4096×8192. Rank 0's widest solve is a row slice of o_proj: alone in its
    phase, it costs 4096·8192² + 8192³ = 1.5·8192³; the average per worker is an eighth of
    that, so o_proj is split into k = ceil(4096·8192² / (1.5·8192³ / 8)) = 3 slices, the first
    (rank 0's) of 1366 rows (q: k = ceil(8192 / (21504 / 8)) = 4 slices of 2048 rows × 4096,
    smaller; every expert linear stays whole: 1536 or 4096 rows × 4096 or 1536). The largest
    pass is every expert's gate/up: 128 Hessians of 4096² on every worker, plus the solver's one."""
    h, e, i_e, attn, kv = 4096, 128, 1536, 64 * 128, 4 * 128
    fit = choose(QWEN3_235B_A22B, build_config(run(8)), device="cuda", budget=80 * GB)
    assert fit.choices == {"quant.moe_experts_per_pass": "auto", "calib.reuse_stages": True,
                           "cluster.activation_memory": None}
    lins = [(attn, h), (kv, h), (kv, h), (h, attn)] + [(i_e, h), (i_e, h), (h, i_e)] * e
    tokens = 16 * 2048
    expect = {
        "framework": 512 * MIB,
        "weights": (sum(o * n for o, n in lins) + e * h + 2 * h + 2 * 128) * 2,  # + router, 2 norms, q/k norms
        "activations": tokens * h * 2,
        "solved_codes": codes(lins),
        "fp32_copies": 2 * 1366 * attn * 4,
        "hessians": (e + 1) * h * h * 4,
        "awq_captures": 0,
        "stage_cache": tokens * (h + attn) * 2,  # attention output, o_proj's input (the sparse MLP has no tail)
        "workspace": 2 * 8 * 2048 * 12288 * 2 + 8 * 2048 * h * 2,  # sized by the dense intermediate_size
    }
    check(fit.plan, expect, 80 * GB)


def test_mixtral_8x22b_on_4_workers_of_80gb():
    """56 sparse blocks of 8 experts (w1/w3 16384×6144, w2 6144×16384). Rank 0's widest solve is a
    whole expert linear of 16384·6144 (gate/up: k = ceil(16384 / (16·22528 / 4)) = 1; o_proj's
    halves are 3072 × 6144). The largest pass is every expert's down: 8 Hessians of 16384²."""
    h, e, i_e, kv = 6144, 8, 16384, 8 * 128
    fit = choose(MIXTRAL_8X22B, build_config(run(4)), device="cuda", budget=80 * GB)
    assert fit.choices["quant.moe_experts_per_pass"] == "auto"
    lins = [(h, h), (kv, h), (kv, h), (h, h)] + [(i_e, h), (i_e, h), (h, i_e)] * e
    tokens = 32 * 2048
    expect = {
        "framework": 512 * MIB,
        "weights": (sum(o * n for o, n in lins) + e * h + 2 * h) * 2,
        "activations": tokens * h * 2,
        "solved_codes": codes(lins),
        "fp32_copies": 2 * i_e * h * 4,
        "hessians": (e + 1) * i_e * i_e * 4,
        "awq_captures": 0,
        "stage_cache": tokens * (h + h) * 2,
        "workspace": 2 * 8 * 2048 * i_e * 2 + 8 * 2048 * h * 2,
    }
    check(fit.plan, expect, 80 * GB)


def _deepseek_terms(workers: int, per_pass: int) -> dict[str, int]:
    """A sparse DeepSeek-V3 block on rank 0 of `workers`, the experts observed `per_pass` at a
    time. MLA attention: q_a 1536×7168, q_b (128·192)×1536, kv_a (512+64)×7168, kv_b
    (128·256)×512, o 7168×(128·128); norms: 2 of 7168, q_a 1536, kv_a 512. One shared expert
    (2048 wide) and 256 routed experts (gate/up 2048×7168, down 7168×2048); the router 256×7168
    and its score-correction bias. Rank 0's widest solve is one of o_proj's row slices
    (k = ceil(7168 · 16384² / ((7168 · 16384² + 16384³) / w))): 7168 / 3 → 2390 rows on 8
    workers, 7168 / 5 → 1434 on 16 (kv_b's slices, q_b's and the experts' linears are smaller).
    The largest pass is gate/up of the first `per_pass` experts with the shared expert's: that
    many plus one Hessians of 7168² on every worker, plus the solver's one."""
    h, e, i_e = 7168, 256, 2048
    attn = [(1536, h), (576, h), (128 * 192, 1536), (128 * 256, 512), (h, 128 * 128)]
    lins = attn + [(i_e, h), (i_e, h), (h, i_e)] * (e + 1)
    tokens = 128 // workers * 2048
    rows = {8: 2390, 16: 1434}[workers]
    return {
        "framework": 512 * MIB,
        "weights": (sum(o * n for o, n in lins) + e * h + e + 2 * h + 1536 + 512) * 2,
        "activations": tokens * h * 2,
        "solved_codes": codes(lins),
        "fp32_copies": 2 * rows * 16384 * 4,
        "hessians": (per_pass + 2) * h * h * 4,
        "awq_captures": 0,
        "stage_cache": tokens * (h + 16384) * 2,
        "workspace": 2 * 8 * 2048 * 18432 * 2 + 8 * 2048 * h * 2,
    }


def test_deepseek_v3_on_8_workers_of_141gb_in_one_pass():
    fit = choose(DEEPSEEK_V3, build_config(run(8)), device="cuda", budget=141 * GB)
    assert fit.choices["quant.moe_experts_per_pass"] == "auto"
    check(fit.plan, _deepseek_terms(8, 256), 141 * GB)


def test_deepseek_v3_on_16_workers_of_80gb_in_passes():
    """All 256 experts at once do not fit 80 GB; `auto` takes the largest multiple of 16 whose
    plan fits 90% of it, worked out here from the terms."""
    fixed = _deepseek_terms(16, 0)
    fits = [n for n in range(16, 256, 16) if block_phase({**fixed, **_deepseek_terms(16, n)}) <= 0.9 * 80 * GB]
    assert block_phase(_deepseek_terms(16, 256)) > 80 * GB
    fit = choose(DEEPSEEK_V3, build_config(run(16)), device="cuda", budget=80 * GB)
    assert fit.choices["quant.moe_experts_per_pass"] == max(fits)
    check(fit.plan, _deepseek_terms(16, max(fits)), 80 * GB)


def test_passes_shrink_the_hessians_by_hand():
    """Qwen3-235B with 16 experts a pass on 8 workers: the largest pass holds 16 Hessians of
    4096², not 128, and the peak drops by 112 of them. With a budget of 12 GB (the one-pass
    peak is 18 GB) `auto` takes the largest multiple of 8 whose peak fits 90% of it (8 more
    would not), before it would touch the stage cache."""
    cfg = build_config(run(8, moe_experts_per_pass=16))
    plan = plan_run(QWEN3_235B_A22B, cfg, device="cuda")
    assert plan.memory["hessians"] == (16 + 1) * 4096 * 4096 * 4
    whole = plan_run(QWEN3_235B_A22B, build_config(run(8)), device="cuda")
    per_expert = 4096 * 4096 * 4
    assert whole.peak - plan.peak == (128 - 16) * per_expert
    fit = choose(QWEN3_235B_A22B, build_config(run(8)), device="cuda", budget=12 * GB)
    n = fit.choices["quant.moe_experts_per_pass"]
    assert n % 8 == 0 and fit.plan.peak <= 0.9 * 12 * GB < fit.plan.peak + 8 * per_expert
    assert fit.plan.peak == whole.peak - (128 - n) * per_expert
    assert fit.choices["calib.reuse_stages"] is True  # passes come before dropping the stage cache


def test_dense_layers_of_a_moe_model_are_sized_dense():
    """Qwen2-MoE with `mlp_only_layers: [0]` and `decoder_sparse_step: 2`: blocks 1 and 3 are
    sparse (60 experts of 1408 and a shared expert of 5632 with its gate), blocks 0 and 2 dense
    (an MLP of 5632). The checkpoint counts each block as what it is, and the block sized is
    the largest (a sparse one)."""
    raw = {"model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
           "shared_expert_intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 2,
           "mlp_only_layers": [0], "vocab_size": 151936, "tie_word_embeddings": False, "qkv_bias": True}
    cfg = build_config({"model": {"path": "/m", "dtype": "bfloat16"}, "calib": {"path": "c.txt"},
                        "quant": {"method": "none"}, "export": {"format": "fake"}})
    plan = plan_run(raw, cfg, device="cpu")
    h = 2048
    attn = 4 * h * h + 3 * h  # q/k/v/o, q/k/v biases
    dense = attn + 3 * 5632 * h + 2 * h
    sparse = attn + 60 * 3 * 1408 * h + 3 * 5632 * h + 60 * h + h + 2 * h  # + router, shared gate
    assert plan.shape.dense_layers == frozenset({0, 2})
    assert plan.checkpoint_bytes == (2 * dense + 2 * sparse + 2 * 151936 * h + h) * 2
    assert plan.block_bytes == sparse * 2


def test_advice_names_fewer_experts_per_pass():
    """Qwen3-235B with 128 experts a pass said explicitly on 8 workers of 14 GB: auto drops the
    stage cache (0.8 GB), still 17.2 GB a worker; half as many experts a pass (64 Hessians of
    4096² fewer, 4.3 GB) is the first change that fits."""
    from shardquant.tools.fit import suggest

    fit = choose(QWEN3_235B_A22B, build_config(run(8, moe_experts_per_pass=128)), device="cuda", budget=14 * GB)
    assert "quant.moe_experts_per_pass" not in fit.choices and fit.choices["calib.reuse_stages"] is False
    assert fit.plan.peak > 14 * GB >= fit.plan.peak - 64 * 4096 * 4096 * 4
    assert suggest(QWEN3_235B_A22B, fit, device="cuda") == "quant.moe_experts_per_pass: 64"
