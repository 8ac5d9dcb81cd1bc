"""Mixture-of-experts: the checkpoint's per-expert layout, the blockwise forward against
transformers' own, per-expert statistics, fallbacks and exports."""

from __future__ import annotations

import math

import pytest
import torch
from moe_fixtures import MOE_FAMILIES
from test_forward import blockwise_logits

from shardquant.model.experts import PerExpert, fused_weights
from shardquant.model.source import ModelSource


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_skeleton_has_the_checkpoints_names_and_fills_transformers_fused_experts(family, moe_models):
    """Every skeleton tensor is a checkpoint tensor under its on-disk name, and the per-expert
    linears, fused as transformers fuses them, equal the fused parameters transformers loads."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = moe_models[family]
    src = ModelSource(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert {n for n, _ in src.skeleton.named_parameters()} == on_disk
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    spec = src.adapter.experts
    sparse = 0
    for i in range(src.num_blocks):
        block = src.block(i)
        experts = block.get_submodule(spec.module) if spec.sparse_layer(src.config.to_dict(), i) else None
        assert isinstance(experts, PerExpert) == (experts is not None)
        if experts is not None:
            sparse += 1
            gate_up, down = fused_weights(block, spec)
            ref_experts = ref.model.layers[i].mlp.experts
            assert torch.equal(gate_up, ref_experts.gate_up_proj)
            assert torch.equal(down, ref_experts.down_proj)
            assert len(src.block_linears(i)) == 4 + 3 * 4 + (3 if spec.shared else 0)
        src.release(block)
    assert sparse == 2  # qwen2_moe: 3 layers, the middle one dense


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_blockwise_logits_equal_transformers_moe(family, moe_models):
    """Identity: the blockwise fp forward (what `method: none` and evaluation run) equals
    transformers' own forward of the whole model, logits and perplexity."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 320, (6, 56), generator=torch.Generator().manual_seed(1))
    ours = blockwise_logits(moe_models[family], ids)
    ref_model = AutoModelForCausalLM.from_pretrained(moe_models[family], dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    nll_ours = torch.nn.functional.cross_entropy(ours[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    nll_ref = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert math.isclose(nll_ours.item(), nll_ref.item(), rel_tol=1e-6)
