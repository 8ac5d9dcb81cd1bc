"""SmoothQuant (`quant.smoothquant`): its scales by hand, folding exact before rounding for every
family (the folding AWQ uses), and the statistics it needs merging exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, read_checkpoint, run_config

from shardquant.algorithms.smoothquant import (
    ChannelMax,
    channel_range,
    smooth_scales,
    smooth_statistic,
    weight_column_max,
)
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
    rows = torch.cat(xs).reshape(-1, 8)
    want_range = rows.amax(0) - rows.amin(0)
    assert torch.equal(channel_range(whole.signed), want_range)
    assert torch.equal(channel_range(merge_stats(parts)["g"].absmax.signed), want_range)
    assert torch.equal(ChannelMax(8).max, torch.zeros(8)) and torch.equal(channel_range(ChannelMax(8).signed), torch.zeros(8))


def test_statistics_of_an_asymmetric_channel():
    """`absmax` is max|x|; `range` is (max - min) / 2: equal on a channel symmetric around
    zero, smaller on one that is not (all positive here)."""
    m = ChannelMax(3)
    m.add(torch.tensor([[-4.0, 1.0, 2.0], [4.0, 3.0, -6.0]]))
    assert torch.equal(smooth_statistic(m.signed, "absmax"), torch.tensor([4.0, 3.0, 6.0]))
    assert torch.equal(smooth_statistic(m.signed, "range"), torch.tensor([4.0, 1.0, 4.0]))
    with pytest.raises(ValueError, match="unknown SmoothQuant statistic"):
        smooth_statistic(m.signed, "mean")


def test_first_norm_takes_the_configured_statistics_scales(tiny_models, texts, tmp_path):
    """End to end (W8A8 RTN + SmoothQuant 0.5, fake export): block 0's input norm is divided
    by the scales computed here from transformers' own forward over the run's calibration
    windows, for `quant.smoothquant_stat` absmax and range; the two folds differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardquant.config import build_config
    from shardquant.data import load_text, token_windows
    from shardquant.pipeline import quantize

    model_dir = tiny_models["llama"]
    folded = {}
    for stat in ("absmax", "range"):
        raw = run_config(model_dir, texts, tmp_path / stat, export={"format": "fake"}, eval={"enabled": False})
        raw["quant"] = {"method": "rtn", "scheme": "W8A8", "smoothquant": 0.5, "smoothquant_stat": stat}
        cfg = build_config(raw)
        quantize(cfg, show_progress=False)
        folded[stat] = read_checkpoint(tmp_path / stat / "model")["model.layers.0.input_layernorm.weight"]
    windows = token_windows(AutoTokenizer.from_pretrained(model_dir), load_text(str(texts["calib"]), key="calib.path"),
                            n_samples=cfg.calib.n_samples, seq_len=cfg.calib.seq_len, seed=cfg.calib.seed,
                            mode="random", key="calib")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    seen = []
    handle = layer.input_layernorm.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(torch.as_tensor(windows))
    handle.remove()
    x = torch.cat(seen)
    w_max = weight_column_max([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    for stat, x_stat in (("absmax", x.abs().amax(0)), ("range", (x.amax(0) - x.amin(0)) / 2)):
        s = (x_stat.sqrt() / w_max.sqrt()).clamp(min=1e-5)
        torch.testing.assert_close(folded[stat], layer.input_layernorm.weight / s, rtol=1e-5, atol=1e-7)
    assert (folded["absmax"] - folded["range"]).abs().max() > 1e-3


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
