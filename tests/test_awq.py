"""AWQ: exact folding for every family, the scale and clip searches, and end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    FAMILIES,
    eval_windows,
    read_checkpoint,
    reference_ppl,
    run_config,
    save_tiny_model,
)

from shardquant.algorithms import awq
from shardquant.algorithms.hessian import HessianAccumulator
from shardquant.algorithms.quantizer import QuantSpec
from shardquant.algorithms.rtn import quantize_rtn
from shardquant.calib.steps import LayerResult, fold_scales, scale_blocker
from shardquant.config import build_config
from shardquant.model.forward import BlockRunner
from shardquant.model.source import ModelSource
from shardquant.pipeline import quantize


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory):
    """A tiny Llama without grouped-query attention (v_proj outputs == o_proj inputs)."""
    return save_tiny_model(tmp_path_factory.mktemp("mha") / "llama", "llama", seed=3, layers=2, kv_heads=4)


def _fold_and_compare(path) -> list[str]:
    """Fold random positive scales into every scalable group of every block; outputs must not move."""
    src = ModelSource(path, device="cpu")
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, src.config.hidden_size, generator=gen)
    skipped = []
    for i in range(src.num_blocks):
        block = src.block(i)
        before = runner.forward(block, i, hidden)
        norms = {n: p.clone() for n, p in block.named_parameters() if "norm" in n}
        for g in src.adapter.groups:
            reason = scale_blocker(block, g)
            if reason is not None:
                skipped.append(reason)
                continue
            n_in = block.get_submodule(g.linears[0]).in_features
            fold_scales(block, g, torch.exp(torch.randn(n_in, generator=gen)))
        after = runner.forward(block, i, hidden)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        # The scales really went somewhere: the norms before q/k/v and gate/up changed ...
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            assert not torch.equal(norms[n], dict(block.named_parameters())[n]), n
        # ... but Qwen3's q_norm/k_norm (after the projections) are untouched.
        for n, p in norms.items():
            if "q_norm" in n or "k_norm" in n:
                assert torch.equal(p, dict(block.named_parameters())[n]), n
        src.release(block)
    return skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_is_exact_for_every_family(family, tiny_models):
    skipped = _fold_and_compare(tiny_models[family])
    # The fixtures use grouped-query attention: v_proj cannot absorb o_proj's scales.
    assert len(skipped) == 3, skipped
    assert all(r.startswith("attn_out:") and "grouped-query" in r for r in skipped), skipped


def test_fold_is_exact_with_v_into_o(mha_llama):
    assert _fold_and_compare(mha_llama) == []


def test_fold_into_an_already_quantized_previous_linear():
    """A quantized prev linear keeps its codes; only its row scales are divided."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=16, scale_dtype=None)
    prev, nxt = torch.nn.Linear(32, 48, bias=True), torch.nn.Linear(48, 8, bias=False)
    qw = quantize_rtn(prev.weight.data, spec)
    prev.weight.data.copy_(qw.dequantize())
    block = torch.nn.ModuleDict({"prev": prev, "nxt": nxt})
    x = torch.randn(5, 32)
    before = nxt(prev(x))
    s = torch.exp(torch.randn(48))
    results = {"prev": LayerResult(qw, 1.0)}
    from shardquant.model.adapters import InputGroup

    g = InputGroup("g", "prev", ("nxt",), consumer="nxt")
    assert scale_blocker(block, g) is None
    fold_scales(block, g, s, results)
    torch.testing.assert_close(nxt(prev(x)), before, rtol=1e-5, atol=1e-5)
    new = results["prev"].weight
    assert torch.equal(new.codes, qw.codes) and torch.equal(new.zeros, qw.zeros)
    torch.testing.assert_close(new.dequantize(), prev.weight.data)
    # The shapes check: a prev with the wrong number of outputs is refused, not crashed on.
    bad = torch.nn.ModuleDict({"prev": torch.nn.Linear(32, 24), "nxt": nxt})
    assert "cannot absorb" in scale_blocker(bad, g)


def _outlier_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=gen)
    x[:, 5] *= 100.0
    w = torch.randn(256, 64, generator=gen) * 0.1
    return x, w


@pytest.mark.parametrize("duo", [False, True])
def test_scale_search_protects_the_outlier_channel(duo):
    """The production search on one linear whose input has an outlier channel: the candidates
    (`awq.candidate_scales`), their losses through the Gram matrix (`awq_search.linear_losses`)
    checked against the error computed on the rows in float64, and the winner
    (`awq.choose_index`) scales the outlier channel up and beats plain rounding."""
    from shardquant.calib.awq_search import linear_losses

    x, w = _outlier_problem()
    spec = QuantSpec(bits=3, group_size=32)
    stats, hessian = awq.ChannelStats(64), HessianAccumulator(64)
    for part in x.split(100):
        stats.add(part)
        hessian.add(part)
    w_mean = awq.weight_mean([w], spec) if duo else None
    cands = awq.candidate_scales(stats.mean(), grid=20, w_mean=w_mean)
    assert len(cands) == 21 and torch.equal(cands[0], torch.ones(64))
    totals, count = linear_losses(hessian, [w], cands, spec)
    assert count == 512 * 256
    ref = x.double() @ w.double().T
    direct = [float((x.double() @ awq.scaled_fake_quantize(w, s, spec).double().T - ref).pow(2).sum())
              for s in cands]
    for got, want in zip(totals, direct, strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    found = awq.choose_index(totals)
    assert found.index >= 2  # a grid ratio (index - 1) / 20 > 0, not the identity
    assert found.loss == min(totals) == totals[found.index] and found.identity_loss == totals[0]
    assert found.loss < 0.75 * found.identity_loss
    s = cands[found.index]
    assert int(s.argmax()) == 5 and s[5] > 2 * s.median()
    assert (s > 0).all() and torch.isfinite(s).all()
    # The identity is kept unless a candidate is strictly better.
    assert awq.choose_index([2.0, 2.0, 3.0]).index == 0 and awq.choose_index([2.0, 3.0, 1.0]).index == 2


def test_scales_are_normalized_and_safe():
    x_mean = torch.tensor([0.0, 1e-30, 1.0, 1e6, 3.0])
    for ratio in (0.0, 0.5, 0.95):
        for w_mean in (None, torch.tensor([0.0, 0.5, 1.0, 1.0, 0.2])):
            s = awq.awq_scales(x_mean, ratio, w_mean)
            assert torch.isfinite(s).all() and (s > 0).all()
            assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(awq.awq_scales(x_mean, 0.0), torch.ones(5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_increases_a_groups_error(symmetric):
    gen = torch.Generator().manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((48, 96))  # heavy tails: clipping pays off
    x = torch.randn(300, 96, generator=gen)
    spec = QuantSpec(bits=3, group_size=32, symmetric=symmetric)
    found = awq.search_clip(w, x, spec, grid=20, max_shrink=0.5, row_batch=20)
    assert (found.err <= found.err_unclipped).all()
    assert (found.ratio < 1).any() and (found.ratio >= 0.55 - 1e-6).all()
    # The reported error is the error of quantizing the clipped weight, group by group.
    q = quantize_rtn(awq.apply_clip(w, spec, found.ratio), spec).dequantize()
    per_group = torch.einsum("ngk,ogk->ong", x.reshape(300, 3, 32), (w - q).reshape(48, 3, 32)).pow(2).mean(1)
    torch.testing.assert_close(per_group, found.err, rtol=1e-4, atol=1e-6)
    # Clipped quantization lowers the layer's total output error here.
    q0 = quantize_rtn(w, spec).dequantize()
    assert (x @ (w - q).T).pow(2).sum() < (x @ (w - q0).T).pow(2).sum()


def test_statistics_merge_exactly_and_hessian_of_scaled_inputs():
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 16, generator=gen, dtype=torch.float64) for n in (3, 10, 7)]
    one, a, b = (awq.ChannelStats(16, dtype=torch.float64) for _ in range(3))
    for x in batches:
        one.add(x)
    a.add(batches[0])
    b.add(batches[1])
    b.add(batches[2])
    a.merge(b)
    assert a.count == one.count == 20
    torch.testing.assert_close(a.mean(), one.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(one.mean(), torch.cat(batches).abs().mean(0))
    s = torch.exp(torch.randn(16, generator=gen, dtype=torch.float64))
    hx, hs = HessianAccumulator(16, dtype=torch.float64), HessianAccumulator(16, dtype=torch.float64)
    for x in batches:
        hx.add(x)
        hs.add(x / s)
    torch.testing.assert_close(awq.scaled_hessian(hx.hessian(), s), hs.hessian())


def _check_export(report, out, texts, bits: int = 3):
    model_dir = out / "model"
    ppl = reference_ppl(model_dir, eval_windows(model_dir, texts))
    assert ppl == pytest.approx(report["ppl"]["quantized"], rel=1e-3)
    weights = read_checkpoint(model_dir)
    for n in [n for n in weights if n.endswith("proj.weight")]:
        w = weights[n]
        groups = w.reshape(w.shape[0], -1, 32)
        distinct = max(len(torch.unique(groups[r, g])) for r in range(0, w.shape[0], 7) for g in range(groups.shape[1]))
        assert distinct <= 2**bits, (n, distinct)
    return weights


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_end_to_end_reloads_with_same_perplexity(method, tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    cfg = build_config(run_config(tiny_models["llama"], texts, out, quant={"method": method, "bits": 3},
                                  export={"format": "fake"}))
    report = quantize(cfg, show_progress=False)
    weights = _check_export(report, out, texts)
    on_disk = json.loads((out / "report.json").read_text())
    for b in on_disk["blocks"]:
        assert len(b["loss"]) == 7 and all(v > 0 for v in b["loss"].values())
        assert set(b["awq"]) == {"attn_in", "mlp_in", "mlp_out"}
        assert all(r["loss"] <= r["identity_loss"] for r in b["awq"].values())
        assert len(b["notes"]) == 1 and "attn_out" in b["notes"][0] and "grouped-query" in b["notes"][0]
    # The scales live in the norms; lm_head (and the embedding) are never scaled.
    from safetensors.torch import load_file

    src = {}
    for f in tiny_models["llama"].glob("*.safetensors"):
        src.update(load_file(f))
    for n in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(weights[n], src[n]), n
    ratios = [b["awq"]["attn_in"]["ratio"] for b in on_disk["blocks"]]
    for i, r in enumerate(ratios):
        changed = not torch.equal(weights[f"model.layers.{i}.input_layernorm.weight"],
                                  src[f"model.layers.{i}.input_layernorm.weight"])
        assert changed == (r is not None)


def test_awq_gptq_scales_v_into_o_without_gqa(mha_llama, texts, tmp_path):
    """Without GQA every group is scaled; v_proj, quantized first, takes o_proj's scales in its qparams."""
    out = tmp_path / "out"
    cfg = build_config(run_config(mha_llama, texts, out, quant={"method": "awq+gptq", "bits": 3},
                                  export={"format": "fake"}))
    report = quantize(cfg, show_progress=False)
    _check_export(report, out, texts)
    for b in report["blocks"]:
        assert "notes" not in b
        assert set(b["awq"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}


def test_config_accepts_awq_and_checks_its_options():
    from shardquant.errors import UserError

    base = {"model": {"path": "m"}}
    for method in ("awq", "awq+gptq"):
        assert build_config(base, {"quant.method": method}).quant.method == method
    with pytest.raises(UserError, match="quant.awq_grid"):
        build_config(base, {"quant.awq_grid": 0})
    with pytest.raises(UserError, match="quant.awq_clip_max_shrink"):
        build_config(base, {"quant.awq_clip_max_shrink": 1.0})


def test_awq_block_options(tiny_models, tmp_path):
    """Asymmetric per-channel, one observation pass, ignored linears inside scaled groups."""
    from shardquant.calib.steps import BlockProfile, calibrate_block
    from shardquant.config import RunConfig
    from shardquant.execution.local import LocalExecutor

    cfg = RunConfig.model_validate({
        "model": {"path": str(tiny_models["qwen3"]), "device": "cpu"},
        "quant": {"method": "awq", "bits": 4, "group_size": -1, "symmetric": False, "true_sequential": False,
                  "ignore": ["lm_head", "k_proj", "mlp.down_proj"], "awq_grid": 4, "awq_clip_grid": 6},
        "export": {"format": "fake"},
        "output": str(tmp_path),
    })
    ex = LocalExecutor(cfg)
    src = ex.worker.source
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    gen = torch.Generator().manual_seed(4)
    x = [torch.randn(2, 48, 64, generator=gen) for _ in range(2)]
    ex.worker.store.put("calib", x)
    ex.begin_block(1)
    block = ex.worker.block
    before = runner.forward_all(block, 1, x)
    k_before = block.get_submodule("self_attn.k_proj").weight.clone()
    prof = BlockProfile()
    res = calibrate_block(ex, "model.layers.1", src.skeleton.get_submodule("model.layers.1"), src.adapter, cfg.quant, prof)
    assert set(res) == {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert set(ex.worker.results) == set(res)
    assert set(prof.awq) == {"attn_in", "mlp_in"}  # attn_out: GQA; mlp_out: nothing to quantize
    # k_proj stays in full precision but carries the q/k/v scales, if any were chosen.
    k = block.get_submodule("self_attn.k_proj").weight
    assert torch.equal(k, k_before) == (prof.awq["attn_in"]["ratio"] is None)
    after = runner.forward_all(block, 1, x)
    err = sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True))
    assert 0 < err < 0.05 * sum(float(b.pow(2).sum()) for b in before)
    ex.close()


def test_linear_output_error_from_the_gram_matrix():
    """||X delta^T||^2 through X^T X equals the error computed on the rows themselves."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 48, generator=gen) * torch.linspace(0.1, 3, 48)
    delta = torch.randn(20, 48, generator=gen) * 1e-2
    acc = HessianAccumulator(48, panel=16)
    acc.add(x[:100])
    acc.add(x[100:])
    direct = float((x.double() @ delta.double().T).pow(2).sum())
    assert awq.linear_output_error(delta, acc.gram()) == pytest.approx(direct, rel=1e-4)
    torch.testing.assert_close(acc.hessian(), 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)


def test_sampled_calls_are_the_same_windows_on_any_split():
    """The AWQ search sample: n windows evenly spaced over all windows, cut out of the batched
    calls (batch-sized tensors only), the same windows however the calls are split over workers."""
    from shardquant.calib.awq_search import sample_calls
    from shardquant.calib.observe import Capture

    gen = torch.Generator().manual_seed(6)
    windows = torch.randn(11, 5, 3, generator=gen)
    rotary = torch.randn(1, 5, 2, generator=gen)  # batch-free: must stay whole

    def capture(part: torch.Tensor, batch: int) -> Capture:
        cap = Capture()
        for i in range(0, len(part), batch):
            x = part[i : i + batch]
            cap.inputs.append(x)
            cap.calls.append(((x,), {"position_embeddings": (rotary, rotary), "mask": x[:, :1, :1] * 0, "flag": True}))
        return cap

    want = windows[awq.even_indices(11, 4)]
    assert want.shape[0] == 4
    for splits in ([11], [6, 5], [4, 4, 3]):
        got, offset = [], 0
        for own in splits:
            for args, kwargs in sample_calls(capture(windows[offset : offset + own], 3), 4, offset, 11):
                assert kwargs["position_embeddings"][0] is rotary and kwargs["flag"] is True
                assert kwargs["mask"].shape[0] == args[0].shape[0]
                got.append(args[0])
            offset += own
        assert torch.equal(torch.cat(got), want), splits
    everything = sample_calls(capture(windows, 3), None)
    assert torch.equal(torch.cat([a[0] for a, _ in everything]), windows)


def test_linear_consumer_search_is_exact_and_sampling_is_a_subset(tiny_models):
    """The production search on a real block (`observe.observing`, `awq_search.search_losses`),
    against errors computed here from the captured inputs: a linear consumer (down_proj) is
    measured exactly on every row through the Gram matrix; a module consumer (the MLP) on the
    sampled windows 0, 4, 8 of 9, as a copy of the module run on them gives."""
    from copy import deepcopy

    from shardquant.calib.awq_search import module_losses, sample_calls, search_losses
    from shardquant.calib.observe import observing
    from shardquant.calib.steps import block_work, quant_spec
    from shardquant.config import QuantConfig

    q = QuantConfig(method="awq", bits=3, group_size=32, awq_grid=5, awq_search_samples=3)
    spec = quant_spec(q)
    src = ModelSource(tiny_models["llama"], device="cpu")
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    block = src.block(0)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(3, 32, 64, generator=gen) for _ in range(3)]
    groups = {g.name: (g, q_) for g, q_ in block_work(src.block_groups(0), "model.layers.0", q)}
    with observing(block, [(n, g.linears[0]) for n, (g, _) in groups.items()], channel=True,
                   capture={n: g.consumer for n, (g, _) in groups.items()}) as obs:
        runner.forward_all(block, 0, batches)
    for name in ("mlp_out", "mlp_in"):
        g, quantized = groups[name]
        cap = obs.captures[name]
        lins = {n: block.get_submodule(n) for n in g.linears}
        before = {n: lin.weight.detach().clone() for n, lin in lins.items()}
        found = search_losses(block, cap, g.linears, quantized, g.consumer, obs.stats[name].channel.mean(), q, spec)
        assert len(found.totals) == len(found.candidates) == 6
        assert all(torch.equal(lins[n].weight, before[n]) for n in lins)  # restored after the search
        assert set(found.originals) == set(quantized)
        assert all(torch.equal(found.originals[n], before[n].float()) for n in quantized)
        with torch.no_grad():
            if name == "mlp_out":  # exact, on every row of all 9 windows
                assert g.consumer in quantized
                w = before[g.consumer].double()
                x = torch.cat(cap.inputs).reshape(-1, w.shape[1]).double()
                ref = [float((x @ (awq.scaled_fake_quantize(w, s, spec).double() - w).T).pow(2).sum())
                       for s in found.candidates]
                assert found.count == 9 * 32 * 64
                # the other production path, running the layer on every call, agrees
                run, run_count = module_losses(lins[g.consumer], lins, quantized, before, found.candidates,
                                               list(cap.calls), spec)
                assert run_count == found.count
                for a, b in zip(run, ref, strict=True):
                    assert a == pytest.approx(b, rel=1e-3)
            else:  # windows 0, 4, 8 of 9
                windows = torch.cat(cap.inputs)[[0, 4, 8]]
                calls = sample_calls(cap, 3)
                assert torch.equal(torch.cat([a[0] for a, _ in calls]), windows)
                mlp = block.get_submodule(g.consumer)
                copy, want = deepcopy(mlp), mlp(windows)
                ref = []
                for s in found.candidates:
                    for n in quantized:
                        w = copy.get_submodule(n.removeprefix(g.consumer + ".")).weight
                        w.copy_(awq.scaled_fake_quantize(before[n], s, spec))
                    ref.append(float((copy(windows) - want).pow(2).sum()))
                assert found.count == 3 * 32 * 64
        assert found.totals[0] > 0
        for a, b in zip(found.totals, ref, strict=True):
            assert a == pytest.approx(b, rel=1e-3)
    src.release(block)


def test_row_chunks_give_the_same_awq_search_and_solve(monkeypatch):
    """AWQ's search losses, weight means and clip + RTN solve go a chunk of rows at a time (no
    whole-weight temporaries): with chunks of 3 rows they give the same codes, scales and
    zeros, and the same errors to float tolerance, as the whole weight at once (the formulas
    written out here on whole tensors)."""
    from torch import nn

    from shardquant.algorithms.quantizer import grouped
    from shardquant.calib.solvers import solve_awq
    from shardquant.calib.steps import GroupStats, SolveTask
    from shardquant.config import QuantConfig

    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=16, symmetric=False)
    lin = nn.Linear(64, 20, bias=False)
    x = torch.randn(200, 64) * torch.linspace(0.1, 3.0, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    s = awq.awq_scales(x.abs().mean(0), 0.5)
    w = lin.weight.detach().clone()
    gram = acc.gram()
    whole_error = awq.linear_output_error(awq.scaled_fake_quantize(w, s, spec) - w, gram)
    g = grouped(w.abs(), spec)
    whole_mean = (g / (g.amax(dim=-1, keepdim=True) + 1e-12)).reshape(20, -1).mean(dim=0)
    q = QuantConfig(method="awq", bits=4, group_size=16, symmetric=False, awq_clip_grid=4)
    task = SolveTask("g", ("lin",), "awq", clip=True, clip_rows=x[::4])
    block = nn.Module()
    block.lin = lin

    def solve():
        return solve_awq(task, block, GroupStats(hessian=acc), s, {"lin": w}, spec, q)

    (whole_w, whole_loss) = solve()
    monkeypatch.setattr(awq, "ROW_CHUNK_ELEMENTS", 3 * 64)
    assert len(awq.row_chunks(20, 64)) == 7  # 6 chunks of 3 rows and one of 2
    chunked_w, chunked_loss = solve()
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(whole_w["lin"], field), getattr(chunked_w["lin"], field)), field
    assert chunked_loss["lin"] == pytest.approx(whole_loss["lin"], rel=1e-5)
    assert awq.scaled_quantization_error(w, s, spec, gram) == pytest.approx(whole_error, rel=1e-5)
    assert torch.allclose(awq.weight_mean([w[:7], w[7:]], spec), whole_mean, rtol=1e-6)
