"""Mixture-of-experts on Ray: two data-parallel workers agree with the local executor
(RTN byte for byte; GPTQ's per-expert token counts and fallbacks exactly, weights up to
float summation order; experts observed in passes give the bytes of one pass)."""

from __future__ import annotations

import pytest
import torch
from conftest import read_checkpoint
from test_ray import TWO, _cfg, quantize, ray_local  # noqa: F401  (ray_local: the module's Ray)


def _files(model_dir):
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))}


@pytest.mark.parametrize(("family", "workers"), [("deepseek_v3", 2), ("qwen2_moe", 3)])
def test_rtn_workers_bytewise_local(ray_local, moe_models, texts, tmp_path, one_thread, family, workers):  # noqa: F811
    """RTN on 2 workers (DeepSeek-V3: MLA, a dense first layer, shared experts, biased
    group-limited routing) and on 3 (Qwen2-MoE: a shared expert with its gate, a dense middle
    layer): the local run's bytes."""
    kw = {"quant": {"method": "rtn", "bits": 4, "group_size": 32}, "export": {"format": "compressed-tensors"}}
    cluster = {**TWO, "workers": workers}
    quantize(_cfg(moe_models[family], texts, tmp_path / "local", **kw), show_progress=False)
    quantize(_cfg(moe_models[family], texts, tmp_path / "ray", cluster=cluster, **kw), show_progress=False)
    local = _files(tmp_path / "local" / "model")
    assert local and local == _files(tmp_path / "ray" / "model")


def test_gptq_two_workers_match_local(ray_local, moe_models, texts, tmp_path, one_thread):  # noqa: F811
    """Routed-only statistics on the starved Mixtral: each worker counts its share of the
    tokens; the sums, and so the RTN fallbacks, equal the local run's. Observed one expert per
    pass (`quant.moe_experts_per_pass: 1`: 4 passes of gate/up, 4 of down, each pass's
    Hessians summed at its owners), the Ray run exports the bytes of one pass over all."""
    kw = {"quant": {"method": "gptq", "bits": 4, "group_size": 32, "moe_calibrate_all_experts": False}}
    local = quantize(_cfg(moe_models["mixtral-starved"], texts, tmp_path / "local", **kw), show_progress=False)
    dist = quantize(_cfg(moe_models["mixtral-starved"], texts, tmp_path / "ray", cluster=TWO, **kw),
                    show_progress=False)
    kw["quant"]["moe_experts_per_pass"] = 1
    passes = quantize(_cfg(moe_models["mixtral-starved"], texts, tmp_path / "passes", cluster=TWO, **kw),
                      show_progress=False)
    assert _files(tmp_path / "passes" / "model") == _files(tmp_path / "ray" / "model")
    assert dist["cluster"]["mode"] == "data"
    for a, b, c in zip(local["blocks"], dist["blocks"], passes["blocks"], strict=True):
        assert a["experts"] == b["experts"]
        assert b["experts"].pop("passes") == 2 and c["experts"].pop("passes") == 8
        assert b["experts"] == c["experts"]
    assert 3 in local["blocks"][0]["experts"]["rtn_fallback"]
    a, b = read_checkpoint(tmp_path / "local" / "model"), read_checkpoint(tmp_path / "ray" / "model")
    assert a.keys() == b.keys()
    experts = [k for k in a if ".experts." in k]
    total = sum(a[k].numel() for k in experts)
    same = sum(int((a[k] == b[k]).sum()) for k in experts)
    assert same / total >= 0.999, f"{total - same} of {total} expert weights differ"
    assert dist["ppl"]["quantized"] == pytest.approx(local["ppl"]["quantized"], rel=2e-3)
    fallback = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert torch.equal(a[fallback], b[fallback])


def test_fp_pipeline_stages_bytewise_local(ray_local, moe_models, texts, tmp_path, one_thread):  # noqa: F811
    """`calib.propagate: fp` on Ray (pipeline stages: each block on one worker, every window):
    GPTQ on the starved Mixtral gives the local run's bytes and expert records."""
    kw = {"quant": {"method": "gptq", "bits": 4, "group_size": 32}, "calib": {"propagate": "fp"}}
    local = quantize(_cfg(moe_models["mixtral-starved"], texts, tmp_path / "local", **kw), show_progress=False)
    dist = quantize(_cfg(moe_models["mixtral-starved"], texts, tmp_path / "ray", cluster=TWO, **kw),
                    show_progress=False)
    assert dist["cluster"]["mode"] == "stages"
    assert [b["experts"] for b in local["blocks"]] == [b["experts"] for b in sorted(dist["blocks"],
                                                                                       key=lambda b: b["index"])]
    local_files = _files(tmp_path / "local" / "model")
    assert local_files and local_files == _files(tmp_path / "ray" / "model")
