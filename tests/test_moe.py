"""Mixture-of-experts: the checkpoint's per-expert layout, the blockwise forward against
transformers' own, per-expert statistics, fallbacks and exports."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from moe_fixtures import MOE_FAMILIES
from test_forward import assert_blockwise_equals_transformers

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
    assert_blockwise_equals_transformers(moe_models[family])


def _calib_windows(model_dir, cfg) -> torch.Tensor:
    """The calibration windows a run of `cfg` reads (prepare's call of token_windows)."""
    from transformers import AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = load_text(cfg.calib.path, key="calib.path")
    return token_windows(tok, text, n_samples=cfg.calib.n_samples, seq_len=cfg.calib.seq_len,
                         seed=cfg.calib.seed, mode="random", key="calib")


def _router_counts(model_dir, windows: torch.Tensor) -> list[list[int]]:
    """Tokens each expert receives in each sparse layer by transformers' own router, on the
    full-precision model (its router logits' top-k)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    k = model.config.num_experts_per_tok
    n = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    with torch.no_grad():
        logits = model(windows, output_router_logits=True).router_logits
    return [torch.bincount(lg.topk(k, dim=-1).indices.reshape(-1), minlength=n).tolist() for lg in logits]


def _moe_run(model_dir, texts, out, **quant):
    from conftest import run_config

    from shardquant.config import build_config

    q = {"method": "gptq", "bits": 4, "group_size": 32, **quant}
    return build_config(run_config(model_dir, texts, out, quant=q, export={"format": "fake"}))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_token_counts_equal_transformers_router(family, moe_models, texts, tmp_path, one_thread):
    """report.json's per-expert token counts equal a direct count of transformers' router on
    the same calibration windows (attention left unquantized and fp propagation, so every
    router sees the full-precision model's inputs); the dense Qwen2-MoE layer has none."""
    from shardquant.pipeline import quantize

    cfg = _moe_run(moe_models[family], texts, tmp_path / "out", ignore=["lm_head", "re:.*self_attn.*"])
    cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"propagate": "fp"})})
    report = quantize(cfg, show_progress=False)
    ref = _router_counts(moe_models[family], _calib_windows(moe_models[family], cfg))
    got = [b["experts"]["tokens"] for b in report["blocks"] if "experts" in b]
    assert got == ref
    rows = cfg.calib.n_samples * cfg.calib.seq_len
    for b in report["blocks"]:
        if "experts" in b:
            assert b["experts"]["rows"] == rows and sum(b["experts"]["tokens"]) == 2 * rows
            assert b["experts"]["statistics_tokens"] == [rows] * 4 and b["experts"]["rtn_fallback"] == []
    assert [("experts" in b) for b in report["blocks"]] == ([True, False, True] if family == "qwen2_moe"
                                                            else [True, True])


def _expert_weight(model_dir, name: str) -> torch.Tensor:
    """One tensor of a checkpoint directory (sharded with an index, or one file)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors[name]


@pytest.mark.parametrize("all_experts", [True, False])
def test_an_expert_no_token_picks(all_experts, moe_models, texts, tmp_path, one_thread):
    """Block 0 of `mixtral-starved` routes nothing to expert 3. With all-experts statistics it
    is calibrated by GPTQ like the others (its weights differ from RTN's); without, it falls
    back to RTN (exactly RTN's weights) and the run says so; nothing is NaN either way."""
    from shardquant.algorithms.rtn import quantize_rtn
    from shardquant.calib.steps import quant_spec
    from shardquant.pipeline import quantize

    src_dir = moe_models["mixtral-starved"]
    out = tmp_path / "out"
    cfg = _moe_run(src_dir, texts, out, moe_calibrate_all_experts=all_experts)
    report = quantize(cfg, show_progress=False)
    b0 = report["blocks"][0]["experts"]
    assert b0["tokens"][3] == 0 and min(b0["tokens"][:3]) > 0
    rows = cfg.calib.n_samples * cfg.calib.seq_len
    assert b0["statistics_tokens"] == ([rows] * 4 if all_experts else b0["tokens"])
    low = [e for e, t in enumerate(b0["tokens"]) if t < cfg.quant.moe_min_tokens]  # 3, maybe more
    assert b0["rtn_fallback"] == ([] if all_experts else low) and 3 in low
    notes = report["blocks"][0].get("notes", [])
    assert any(f"experts {low}" in n and "RTN" in n for n in notes) != all_experts
    assert math.isfinite(report["ppl"]["quantized"])
    assert all(math.isfinite(v) for b in report["blocks"] for v in b["loss"].values())
    for name in ("w1", "w2", "w3"):
        key = f"model.layers.0.block_sparse_moe.experts.3.{name}.weight"
        exported, original = _expert_weight(out / "model", key), _expert_weight(src_dir, key)
        assert torch.isfinite(exported).all()
        rtn = quantize_rtn(original.float(), quant_spec(cfg.quant)).dequantize()
        assert torch.equal(exported, rtn) != all_experts, name


_QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|(block_sparse_moe|mlp)\.experts\.\d+\.(w[123]|gate_proj|up_proj|"
    r"down_proj)|mlp\.shared_expert\.(gate|up|down)_proj|mlp\.(gate|up|down)_proj)\.weight"
)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_compressed_tensors_export_keeps_per_expert_names_and_reloads(family, moe_models, texts, tmp_path, one_thread):
    """The compressed-tensors export of a GPTQ run: its tensor names are the input
    checkpoint's, each quantized linear's weight replaced by the format's suffixes (routers
    and the shared expert's gate stay as they are and are listed in `ignore`); transformers +
    compressed-tensors reload it, and it evaluates like the fake export (within 0.2%)."""
    from conftest import eval_windows, reference_ppl
    from safetensors import safe_open

    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    src = moe_models[family]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        inputs = set(f.keys())
    ppl = {}
    for fmt in ("fake", "compressed-tensors"):
        out = tmp_path / fmt
        cfg = _moe_run(src, texts, out).model_dump()
        cfg["export"]["format"] = fmt
        quantize(build_config(cfg), show_progress=False)
        ppl[fmt] = reference_ppl(out / "model", eval_windows(out / "model", texts))
    model = tmp_path / "compressed-tensors" / "model"
    names = set()
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    quantized = {n for n in inputs if _QUANTIZED.fullmatch(n)}
    assert len(quantized) == sum(4 + 3 * 4 + (3 if family == "qwen2_moe" else 0) for _ in range(2)) + (
        7 if family == "qwen2_moe" else 0)  # qwen2_moe: two sparse blocks and a dense one
    expected = (inputs - quantized) | {
        n.removesuffix(".weight") + s for n in quantized for s in (".weight_packed", ".weight_scale", ".weight_shape")
    }
    assert names == expected
    ignore = json.loads((model / "config.json").read_text())["quantization_config"]["ignore"]
    router = "block_sparse_moe.gate" if family == "mixtral" else "mlp.gate"
    sparse = [0, 2] if family == "qwen2_moe" else [0, 1]
    assert {f"model.layers.{i}.{router}" for i in sparse} <= set(ignore)
    assert ("model.layers.0.mlp.shared_expert_gate" in ignore) == (family == "qwen2_moe")
    from shardquant.export.inspection import inspect_checkpoint

    floats = inspect_checkpoint(model).not_quantized  # what `shardquant inspect` prints as float
    assert {f"model.layers.{i}.{router}" for i in sparse} <= set(floats)
    assert not any(".experts." in n for n in floats)
    assert math.isfinite(ppl["fake"])
    assert ppl["compressed-tensors"] == pytest.approx(ppl["fake"], rel=2e-3)


def test_wandb_block_row_has_expert_tokens_and_fallbacks():
    from shardquant.record.tracking import block_metrics

    rec = {"index": 0, "seconds": 1.0, "worker": "local", "loss": {},
           "experts": {"tokens": [5, 0, 7], "rows": 6, "statistics_tokens": [5, 0, 7], "rtn_fallback": [1]}}
    row = block_metrics(rec)
    assert [row[f"experts/tokens/{e}"] for e in range(3)] == [5, 0, 7]
    assert row["experts/rtn_fallbacks"] == 1
    assert not any(k.startswith("experts/") for k in block_metrics({**rec, "experts": None}))


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_and_awq_exports_keep_per_expert_names(fmt, moe_models, texts, tmp_path, one_thread):
    """The gptq and awq formats write every expert's linear under its checkpoint name with the
    format's suffixes (the names vLLM's fused-MoE loaders read); the router stays a float weight."""
    from safetensors import safe_open

    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    src = moe_models["mixtral"]
    cfg = _moe_run(src, texts, tmp_path / "out").model_dump()
    cfg["export"]["format"] = fmt
    quantize(build_config(cfg), show_progress=False)
    names = set()
    for f in (tmp_path / "out" / "model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    suffixes = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}[fmt]
    for i in range(2):
        for e in range(4):
            for lin in ("w1", "w2", "w3"):
                prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}.{lin}"
                assert {f"{prefix}.{s}" for s in suffixes} <= names and f"{prefix}.weight" not in names
        assert f"model.layers.{i}.block_sparse_moe.gate.weight" in names


def test_awq_on_experts_scales_each_experts_down_and_falls_back_without_tokens(moe_models, texts, tmp_path,
                                                                               one_thread):
    """AWQ on the starved Mixtral with routed-only statistics: each calibrated expert's up ->
    down scale is searched, the experts' shared input is left unscaled (the norm also feeds
    the router), and an expert without enough tokens gets RTN and no search; all finite."""
    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    cfg = _moe_run(moe_models["mixtral-starved"], texts, tmp_path / "out", method="awq",
                   moe_calibrate_all_experts=False, awq_grid=4, awq_clip_grid=4)
    report = quantize(build_config(cfg.model_dump()), show_progress=False)
    b0 = report["blocks"][0]
    low = b0["experts"]["rtn_fallback"]
    assert 3 in low
    assert {f"expert.{e}.out" for e in range(4) if e not in low} <= set(b0["awq"])
    assert not any(f"expert.{e}." in g for e in low for g in b0["awq"])
    assert not any(g.startswith("expert.") and g.endswith(".in") for g in b0["awq"])
    assert any("expert.0.in" in n or "expert.1.in" in n for n in b0["notes"])
    assert math.isfinite(report["ppl"]["quantized"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_method_none_run_matches_transformers_and_exports_the_checkpoint(family, moe_models, texts, tmp_path):
    """`quant.method: none` through the whole pipeline: its perplexity is transformers' own,
    and the export is the input checkpoint, every per-expert tensor by name and bit for bit."""
    from conftest import eval_windows, read_checkpoint, reference_ppl
    from safetensors.torch import load_file

    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    src = moe_models[family]
    cfg = _moe_run(src, texts, tmp_path / "out", method="none").model_dump()
    report = quantize(build_config(cfg), show_progress=False)
    assert report["ppl"]["quantized"] == pytest.approx(reference_ppl(src, eval_windows(src, texts)), rel=1e-5)
    original = load_file(src / "model.safetensors")
    exported = read_checkpoint(tmp_path / "out" / "model")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
