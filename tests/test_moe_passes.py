"""Experts observed in passes (`quant.moe_experts_per_pass`): a worker holds only one pass's
experts' Hessians, and the codes are those of one pass over every expert."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config
from torch import nn

from shardquant.config import build_config
from shardquant.model.adapters import ADAPTERS
from shardquant.model.experts import ExpertMLP, PerExpert


def test_a_pass_over_some_experts_runs_only_those_and_counts_every_route():
    """`PerExpert.active`: the output is the active experts' share of transformers' routed sum,
    written out here by hand (down(silu(gate x) * up x) times the routing weight), and the
    routing counts still cover every expert."""
    torch.manual_seed(0)
    spec = ADAPTERS["mixtral"].experts
    experts = PerExpert([ExpertMLP(spec, 8, 12, nn.SiLU()) for _ in range(4)])
    x = torch.randn(10, 8)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    weight = torch.rand(10, 2)
    experts.active, experts.counting = frozenset({1, 3}), True
    with torch.no_grad():
        got = experts(x, index, weight)
    want = torch.zeros(10, 8)
    for n in range(10):
        for j in range(2):
            e = int(index[n, j])
            if e in (1, 3):
                m = experts[e]
                h = torch.nn.functional.silu(m.w1.weight @ x[n]) * (m.w3.weight @ x[n])
                want[n] += weight[n, j] * (m.w2.weight @ h)
    torch.testing.assert_close(got, want)
    assert experts.routed.tolist() == torch.bincount(index.reshape(-1), minlength=4).tolist()
    assert experts.rows == 10


def _files(model_dir):
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))}


def test_passes_chosen_by_the_budget_give_the_codes_of_one_pass(moe_models, texts, tmp_path, one_thread):
    """Qwen2-MoE (a shared expert, a dense middle layer), GPTQ: with `cluster.worker_memory` one
    byte under the plan's peak for all 4 experts at once, `auto` observes them in passes of 3
    (4 and 3 fit 90% of the budget: no; 3 fits the budget: yes), so each sparse block takes 4
    expert passes instead of 2 (gate/up of 3 + 1, down of 3 + 1; the shared expert with the
    first). The exported codes are byte for byte those of one pass over every expert, and so
    are the per-expert token counts."""
    from shardquant.pipeline import quantize
    from shardquant.tools.plan import plan_from_config

    model = moe_models["qwen2_moe"]
    kw = {"quant": {"method": "gptq", "bits": 4, "group_size": 32}, "export": {"format": "compressed-tensors"}}
    whole = quantize(build_config(run_config(model, texts, tmp_path / "whole", **kw)), show_progress=False)
    peak = plan_from_config(build_config(run_config(model, texts, tmp_path / "x", **kw)), device="cpu").peak
    cfg = build_config(run_config(model, texts, tmp_path / "split", cluster={"worker_memory": str(peak - 1)}, **kw))
    split = quantize(cfg, show_progress=False)
    assert whole["memory"]["auto"]["quant.moe_experts_per_pass"] == "auto"
    assert split["memory"]["auto"]["quant.moe_experts_per_pass"] == 3
    sparse = [i for i, b in enumerate(whole["blocks"]) if "experts" in b]
    assert sparse == [0, 2]
    for i in sparse:
        a, b = whole["blocks"][i]["experts"], split["blocks"][i]["experts"]
        assert a.pop("passes") == 2 and b.pop("passes") == 4
        assert a == b
    got = _files(tmp_path / "split" / "model")
    assert got and got == _files(tmp_path / "whole" / "model")
    assert split["ppl"] == whole["ppl"]


@pytest.mark.parametrize("bad", [0, -2, "all"])
def test_experts_per_pass_must_be_auto_or_positive(bad, tmp_path):
    from shardquant.errors import UserError

    with pytest.raises(UserError, match="quant.moe_experts_per_pass"):
        build_config({"model": {"path": str(tmp_path)}, "calib": {"path": "c.txt"},
                      "quant": {"method": "gptq", "moe_experts_per_pass": bad}})


def test_awq_shared_input_scale_with_experts_in_passes(moe_models, texts, tmp_path, one_thread):
    """awq+gptq on Qwen2-MoE with one expert per pass: the experts' shared-input scale is
    searched and folded in the first pass; experts observed in later passes read the folded
    input, so their Hessians take no second scaling. The chosen scales, the codes and the
    perplexity equal those of one pass over every expert."""
    from shardquant.pipeline import quantize

    model = moe_models["qwen2_moe"]
    reports = {}
    for per_pass in ("auto", 1):
        kw = {"quant": {"method": "awq+gptq", "bits": 4, "group_size": 32, "awq_grid": 4,
                        "moe_experts_per_pass": per_pass}, "export": {"format": "compressed-tensors"}}
        reports[per_pass] = quantize(build_config(run_config(model, texts, tmp_path / str(per_pass), **kw)),
                                     show_progress=False)
    whole, split = reports["auto"], reports[1]
    assert [b["experts"]["passes"] for b in split["blocks"] if "experts" in b] == [8, 8]
    for a, b in zip(whole["blocks"], split["blocks"], strict=True):
        assert {g: r["ratio"] for g, r in a["awq"].items()} == {g: r["ratio"] for g, r in b["awq"].items()}
    assert "experts_in" in whole["blocks"][0]["awq"]
    got = _files(tmp_path / "1" / "model")
    assert got and got == _files(tmp_path / "auto" / "model")
    assert split["ppl"] == whole["ppl"]
