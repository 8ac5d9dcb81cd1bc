"""`shardquant plan` on mixture-of-experts configs: every expert's linears and the router
are counted (checked against the published parameter counts), and the Hessians of one
observation pass are those of every expert of the pass."""

from __future__ import annotations

from test_plan import model_dir

from shardquant.config import build_config
from shardquant.tools.plan import plan_from_config

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
}


def _plan(tmp_path, raw, **quant):
    cfg = {
        "model": {"path": str(model_dir(tmp_path, raw)), "dtype": "bfloat16"},
        "calib": {"path": "calib.txt", "n_samples": 128, "seq_len": 2048, "batch_size": 8},
        "quant": {"method": "gptq", "bits": 4, "group_size": 128, **quant},
        "export": {"format": "fake"},
    }
    return plan_from_config(build_config(cfg), device="cuda")


def test_mixtral_8x7b_checkpoint_is_its_published_parameter_count(tmp_path):
    """Mixtral-8x7B has 46,702,792,704 parameters: per layer q/o 4096², k/v 1024·4096,
    8 experts × 3 linears of 14336·4096, the router 8·4096, two norms; embedding and lm_head
    32000·4096 each, the final norm. The fake export holds them in bfloat16."""
    p = _plan(tmp_path, MIXTRAL_8X7B)
    assert p.shape.experts == 8 and len(p.shape.linears()) == 4 + 8 * 3
    assert p.shape.linears()["block_sparse_moe.experts.7.w2"] == (4096, 14336)
    layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 3 * 14336 * 4096 + 8 * 4096 + 2 * 4096
    assert p.block_bytes == layer * 2
    assert 32 * layer + 2 * 32000 * 4096 + 4096 == 46_702_792_704
    assert p.checkpoint_bytes == 46_702_792_704 * 2


def test_qwen3_30b_a3b_checkpoint_and_expert_hessians(tmp_path):
    """Qwen3-30B-A3B has 30,532,122,624 parameters (128 experts of 768, q/k norms). With
    true-sequential GPTQ the largest pass is every expert's gate/up at once: 128 Hessians of
    2048² (plus one work matrix) in float32."""
    p = _plan(tmp_path, QWEN3_30B_A3B)
    layer = (2048 * 4096 * 2 + 2 * 512 * 2048) + 128 * 3 * 768 * 2048 + 128 * 2048 + 2 * 2048 + 2 * 128
    assert 48 * layer + 2 * 151936 * 2048 + 2048 == 30_532_122_624
    assert p.checkpoint_bytes == 30_532_122_624 * 2
    assert p.memory["hessians"] == (128 * 2048 * 2048 + 2048 * 2048) * 4
