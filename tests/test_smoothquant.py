"""SmoothQuant (`quant.smoothquant`): its scales by hand, folding exact before rounding for every
family (the folding AWQ uses), and the statistics it needs merging exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from shardquant.algorithms.smoothquant import ChannelMax, smooth_scales, weight_column_max
from shardquant.calib.steps import GroupStats, fold_scales, merge_stats, smooth_blocker
from shardquant.model.forward import BlockRunner
from shardquant.model.source import ModelSource


def test_scales_by_hand():
    x_max = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = [torch.tensor([[1.0, -0.25, 2.0, 0.0]]), torch.tensor([[-0.5, 0.5, 1.0, 0.0]])]
    w_max = weight_column_max(w)
    assert w_max.tolist() == [1.0, 0.5, 2.0, 0.0]
    s = smooth_scales(x_max, w_max, 0.5)
    # 4^.5 / 1^.5 = 2; 1 / 0.5^.5 = sqrt(2); a channel that never fired and a column of zero
    # weights keep scale 1 (nothing to migrate, and no division by zero).
    torch.testing.assert_close(s, torch.tensor([2.0, 2.0**0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(x_max, w_max, 1.0)


def test_channel_max_merges_exactly():
    """max |x| per channel over batches and workers: one accumulator over all rows equals
    per-part accumulators merged (by max), also through `merge_stats`."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 8, generator=g) * (k + 1) for k in range(4)]
    whole = ChannelMax(8)
    for x in xs:
        whole.add(x)
    assert torch.equal(whole.max, torch.cat(xs).abs().reshape(-1, 8).amax(0))
    parts = []
    for x in (xs[:1], xs[1:]):
        m = ChannelMax(8)
        for t in x:
            m.add(t)
        parts.append({"g": GroupStats(absmax=m)})
    assert torch.equal(merge_stats(parts)["g"].absmax.max, whole.max)
    assert torch.equal(merge_stats(parts, own_first=True)["g"].absmax.max, whole.max)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_is_exact_for_every_family(family, tiny_models):
    """SmoothQuant's scales (from random input maxima and the block's weights) folded into every
    group whose input is a norm's output: each block computes the same function before
    rounding; the groups fed by a linear (o_proj, down_proj) are left alone."""
    src = ModelSource(tiny_models[family], device="cpu")
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 40, src.config.hidden_size, generator=gen)
    for i in range(src.num_blocks):
        block = src.block(i)
        before = runner.forward(block, i, hidden)
        smoothed, skipped = [], []
        for g in src.adapter.groups:
            reason = smooth_blocker(block, g)
            if reason is not None:
                skipped.append(g.name)
                assert "not a norm" in reason, reason
                continue
            lins = [block.get_submodule(n) for n in g.linears]
            x_max = torch.rand(lins[0].in_features, generator=gen) * 20
            s = smooth_scales(x_max, weight_column_max([lin.weight for lin in lins]), 0.5)
            assert (s - 1).abs().max() > 0.1  # scales that really move the weights
            fold_scales(block, g, s)
            smoothed.append(g.name)
        assert smoothed == ["attn_in", "mlp_in"] and skipped == ["attn_out", "mlp_out"], (smoothed, skipped)
        torch.testing.assert_close(runner.forward(block, i, hidden), before, rtol=1e-4, atol=1e-4)
        src.release(block)
