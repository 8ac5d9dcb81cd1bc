"""Tiny random mixture-of-experts models, saved as transformers saves them (per-expert names)."""

from __future__ import annotations

from pathlib import Path

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_moe_config(family: str, *, layers: int = 2, experts: int | None = None, top_k: int = 2, vocab: int = 320):
    """A small config with several experts (4; DeepSeek-V3 8), top-k routing; Qwen2-MoE gets a
    shared expert and (with 3+ layers) a dense layer (`mlp_only_layers`); DeepSeek-V3 gets MLA
    attention (low-rank q), two shared experts, group-limited routing (2 of 4 groups) and a
    dense first layer (`first_k_dense_replace`)."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    experts = experts or (8 if family == "deepseek_v3" else 4)
    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5, num_experts_per_tok=top_k,
    )
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=96, num_local_experts=experts)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                              shared_expert_intermediate_size=96, mlp_only_layers=[1] if layers > 2 else [],
                              norm_topk_prob=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, num_experts=experts,
                              head_dim=16, norm_topk_prob=True)
    if family == "deepseek_v3":
        return DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=128, moe_intermediate_size=32,
                                n_routed_experts=experts, n_shared_experts=2, n_group=4, topk_group=2,
                                first_k_dense_replace=1 if layers > 2 else 0, q_lora_rank=96, kv_lora_rank=32,
                                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8, routed_scaling_factor=2.5,
                                norm_topk_prob=True, num_nextn_predict_layers=0)
    raise ValueError(family)


def randomize(model: torch.nn.Module) -> None:
    """Norms near 1, every matrix (and fused [E, out, in] expert stack) ~ N(0, 1/in), a
    router's score-correction bias (DeepSeek-V3) ~ N(0, 0.1^2), so it changes the routing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))


def starve_expert(model: torch.nn.Module, expert: int) -> None:
    """Make block 0's router never pick `expert`: embedding channel 0 is a constant 1 that
    block 0's attention leaves alone (o_proj row 0 zero), so the router input's channel 0 is
    always positive; the expert's router row is -100 there and 0 elsewhere, and the other
    experts' rows ignore channel 0 (so they still share the tokens)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight[0] = 0.0
        router = layer.mlp.gate.weight
        router[:, 0] = 0.0
        router[expert] = 0.0
        router[expert, 0] = -100.0


def save_tiny_moe(directory: Path, family: str, *, seed: int = 0, starve: int | None = None, **kw) -> Path:
    """Build, randomize and save a tiny MoE model (safetensors, fp32) with the fixture tokenizer."""
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, **kw), dtype=torch.float32,
                                             attn_implementation="sdpa")
    randomize(model)
    if starve is not None:
        starve_expert(model, starve)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    build_tokenizer(directory, vocab_size=kw.get("vocab", 320))
    return directory
