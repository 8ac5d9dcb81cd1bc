"""The blockwise forward agrees with transformers' own forward of the whole model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES

from shardquant.model.forward import BlockRunner, embed_batches, head_logits
from shardquant.model.source import ModelSource


def blockwise_logits(path, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    src = ModelSource(path, device="cpu")
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    emb = src.load(src.adapter.embed)
    hidden = embed_batches(emb, ids, batch_size, src.device)
    src.release(emb)
    for i in range(src.num_blocks):
        block = src.block(i)
        hidden = runner.forward_all(block, i, hidden)
        src.release(block)
        assert all(p.is_meta for p in block.parameters()), "block not freed"
    norm = src.load(src.adapter.final_norm)
    head = src.load(src.adapter.lm_head)
    return torch.cat([head_logits(norm, head.weight, h) for h in hidden])


def assert_blockwise_equals_transformers(path) -> None:
    """The blockwise fp forward of the saved model at `path` gives transformers' own whole-model
    logits, and the perplexity from them."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 320, (6, 56), generator=torch.Generator().manual_seed(1))
    ours = blockwise_logits(path, ids)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    nll_ours = torch.nn.functional.cross_entropy(ours[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    nll_ref = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert math.isclose(nll_ours.item(), nll_ref.item(), rel_tol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_logits_equal_transformers(family, tiny_models):
    assert_blockwise_equals_transformers(tiny_models[family])


def test_sliding_window_is_applied(tiny_models):
    """Mistral and Llama fixtures share weights (same seed): only the sliding mask differs."""
    ids = torch.randint(0, 320, (2, 56), generator=torch.Generator().manual_seed(2))
    llama = blockwise_logits(tiny_models["llama"], ids)
    mistral = blockwise_logits(tiny_models["mistral"], ids)
    window = 24
    torch.testing.assert_close(llama[:, :window], mistral[:, :window])
    assert (llama[:, window:] - mistral[:, window:]).abs().max() > 1e-2


def test_mask_builders_get_the_cache_argument_under_this_transformers_name():
    """transformers 5.x renamed the mask builders' `past_key_values` to `cache`; the runner
    must pass whichever name the installed version takes (5.17 raised TypeError on `cache`)."""
    import inspect

    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from shardquant.model.forward import _cache_kwarg

    for make in (create_causal_mask, create_sliding_window_causal_mask):
        assert _cache_kwarg() in inspect.signature(make).parameters


def test_stream_nll_sums_every_window_of_uneven_batches():
    """5 windows in batches of 2, 2, 1: the summed NLL and count of all 5 at once."""
    from shardquant.model.forward import stream_nll

    g = torch.Generator().manual_seed(3)
    norm = torch.nn.LayerNorm(16)
    head = torch.randn(40, 16, generator=g)
    hidden = torch.randn(5, 12, 16, generator=g)
    tokens = torch.randint(0, 40, (5, 12), generator=g)
    total, count = stream_nll(norm, head, [hidden[0:2], hidden[2:4], hidden[4:5]], tokens, 2)
    with torch.no_grad():
        logits = torch.nn.functional.linear(norm(hidden), head)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1), reduction="sum"
    )
    assert count == 5 * 11
    assert total == pytest.approx(ref.item(), rel=1e-5)
