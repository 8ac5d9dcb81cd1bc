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
    """Every skeleton tensor (DeepSeek-V3's router bias too) is a checkpoint tensor under its on-disk name, and the per-expert
    linears, fused as transformers fuses them, equal the fused parameters transformers loads."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = moe_models[family]
    src = ModelSource(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert set(src.skeleton.state_dict()) == on_disk  # parameters and persistent buffers
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
            attention = 5 if family == "deepseek_v3" else 4  # MLA: q_a, q_b, kv_a, kv_b, o
            assert len(src.block_linears(i)) == attention + 3 * len(experts) + (3 if spec.shared else 0)
        src.release(block)
    assert sparse == 2  # qwen2_moe: 3 layers, the middle one dense; deepseek_v3: 3, the first dense


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
    """Tokens each expert receives in each sparse layer by transformers' own router on the
    full-precision model: the expert indices each router returns (its last output; for
    DeepSeek-V3 after the score-correction bias and the group limit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routers = [r for layer in model.model.layers if (r := getattr(layer.mlp, "gate", None)) is not None]
    n = routers[0].weight.shape[0]
    counts = [torch.zeros(n, dtype=torch.int64) for _ in routers]

    def count(into: torch.Tensor):
        def hook(_module, _args, out) -> None:
            into.add_(torch.bincount(out[-1].reshape(-1), minlength=n))
        return hook

    hooks = [r.register_forward_hook(count(c)) for r, c in zip(routers, counts, strict=True)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return [c.tolist() for c in counts]


def _moe_run(model_dir, texts, out, **quant):
    from conftest import run_config

    from shardquant.config import build_config

    q = {"method": "gptq", "bits": 4, "group_size": 32, **quant}
    return build_config(run_config(model_dir, texts, out, quant=q, export={"format": "fake"}))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_expert_token_counts_equal_transformers_router(family, moe_models, texts, tmp_path, one_thread):
    """report.json's per-expert token counts equal a direct count of transformers' router on
    the same calibration windows (attention left unquantized and fp propagation, so every
    router sees the full-precision model's inputs); the dense Qwen2-MoE and DeepSeek-V3
    layers have none."""
    from shardquant.pipeline import quantize

    cfg = _moe_run(moe_models[family], texts, tmp_path / "out", ignore=["lm_head", "re:.*self_attn.*"])
    cfg = cfg.model_copy(update={"calib": cfg.calib.model_copy(update={"propagate": "fp"})})
    report = quantize(cfg, show_progress=False)
    ref = _router_counts(moe_models[family], _calib_windows(moe_models[family], cfg))
    got = [b["experts"]["tokens"] for b in report["blocks"] if "experts" in b]
    assert got == ref
    rows = cfg.calib.n_samples * cfg.calib.seq_len
    n = len(ref[0])
    for b in report["blocks"]:
        if "experts" in b:
            assert b["experts"]["rows"] == rows and sum(b["experts"]["tokens"]) == 2 * rows
            assert b["experts"]["statistics_tokens"] == [rows] * n and b["experts"]["rtn_fallback"] == []
    sparse = {"qwen2_moe": [True, False, True], "deepseek_v3": [False, True, True]}.get(family, [True, True])
    assert [("experts" in b) for b in report["blocks"]] == sparse


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
    r"model\.layers\.\d+\.(self_attn\.([qkvo]|q_a|q_b|kv_a|kv_b)_proj(_with_mqa)?|(block_sparse_moe|mlp)\.experts\.\d+\."
    r"(w[123]|gate_proj|up_proj|down_proj)|mlp\.shared_experts?\.(gate|up|down)_proj|mlp\.(gate|up|down)_proj)\.weight"
)
# Quantized linears of each fixture, by hand: attention + 3 per expert (+ 3 shared) per sparse
# block, attention + 3 per dense block.
_N_QUANTIZED = {
    "mixtral": 2 * (4 + 3 * 4), "qwen3_moe": 2 * (4 + 3 * 4),
    "qwen2_moe": 2 * (4 + 3 * 4 + 3) + (4 + 3),
    "deepseek_v3": (5 + 3) + 2 * (5 + 3 * 8 + 3),
}
_SPARSE = {"qwen2_moe": [0, 2], "deepseek_v3": [1, 2]}


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
    assert len(quantized) == _N_QUANTIZED[family]
    expected = (inputs - quantized) | {
        n.removesuffix(".weight") + s for n in quantized for s in (".weight_packed", ".weight_scale", ".weight_shape")
    }
    assert names == expected
    ignore = json.loads((model / "config.json").read_text())["quantization_config"]["ignore"]
    router = "block_sparse_moe.gate" if family == "mixtral" else "mlp.gate"
    sparse = _SPARSE.get(family, [0, 1])
    assert {f"model.layers.{i}.{router}" for i in sparse} <= set(ignore)
    assert ("model.layers.0.mlp.shared_expert_gate" in ignore) == (family == "qwen2_moe")
    if family == "deepseek_v3":  # the router's score-correction bias is kept as it was
        assert {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in sparse} <= names
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
    """AWQ on the starved Mixtral with routed-only statistics: the experts' shared input gets
    one searched scale (`experts_in`, with the router), each calibrated expert's up -> down
    scale is searched, and an expert without enough tokens gets RTN and no search of its own;
    no expert's gate/up is reported as skipped; all finite."""
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
    assert all("experts_in" in b["awq"] for b in report["blocks"])
    assert not any(".in:" in n and "expert." in n for n in b0.get("notes", []))
    assert math.isfinite(report["ppl"]["quantized"])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_awq_shared_input_scale_folds_exactly(family, moe_models):
    """AWQ's scale for a sparse block's input (`Experts.shared_input`): random scales folded
    from post_attention_layernorm into the router's columns (Qwen2-MoE's shared_expert_gate's
    too), every expert's and the shared expert's gate/up leave the block's output (routing
    included) where it was, before any rounding; the norm and the router really changed."""
    from shardquant.calib.steps import fold_scales, scale_blocker
    from shardquant.model.forward import BlockRunner

    src = ModelSource(moe_models[family])
    spec = src.adapter.experts
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, src.config.hidden_size, generator=gen)
    i = 1 if family == "deepseek_v3" else 0  # a sparse block
    block = src.block(i)
    (group,) = src.adapter.scale_groups(len(block.get_submodule(spec.module)))
    members = {n for g in src.block_groups(i) if g.phase == "moe_in" for n in g.linears}
    assert set(group.linears) == {spec.router, *spec.input_readers, *members}
    assert (spec.input_readers == ("mlp.shared_expert_gate",)) == (family == "qwen2_moe")
    before = runner.forward(block, i, hidden)
    old = {n: block.get_submodule(n).weight.clone() for n in ("post_attention_layernorm", spec.router)}
    assert scale_blocker(block, group) is None
    fold_scales(block, group, torch.exp(torch.randn(src.config.hidden_size, generator=gen)))
    torch.testing.assert_close(runner.forward(block, i, hidden), before, rtol=1e-4, atol=1e-4)
    assert all(not torch.equal(w, block.get_submodule(n).weight) for n, w in old.items())


def test_awq_shared_input_scale_lowers_the_experts_error(moe_models, texts, tmp_path, one_thread):
    """On the tiny Mixtral with two outlier channels in the experts' input (post_attention_
    layernorm ×20 there; attention left unquantized), AWQ's shared-input scale is chosen in
    every block with a lower search loss than no scale, and the first block's output, by
    transformers' own forward of the exports, is closer to the full-precision model's than
    RTN's (w3g32)."""
    import shutil

    from conftest import eval_windows
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from shardquant.pipeline import quantize

    src = tmp_path / "outliers"
    shutil.copytree(moe_models["mixtral"], src)
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("post_attention_layernorm.weight"):
            t[[5, 17]] *= 20.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    windows = eval_windows(src, texts)

    def first_block_output(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(windows, output_hidden_states=True).hidden_states[1]

    ref = first_block_output(src)
    err = {}
    for method in ("rtn", "awq"):
        cfg = _moe_run(src, texts, tmp_path / method, method=method, bits=3, ignore=["lm_head", "re:.*self_attn.*"])
        report = quantize(cfg, show_progress=False)
        err[method] = float((first_block_output(tmp_path / method / "model") - ref).pow(2).mean())
        if method == "awq":
            for b in report["blocks"]:
                found = b["awq"]["experts_in"]
                assert found["ratio"] is not None and found["loss"] < found["identity_loss"]
    assert err["awq"] < 0.8 * err["rtn"], err


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


def test_rtn_on_deepseek_v3_rounds_every_linear_and_keeps_the_rest(moe_models, texts, tmp_path, one_thread):
    """RTN end to end on the tiny DeepSeek-V3 (MLA attention, a dense first layer, shared and
    routed experts): each quantized linear of the fake export is RTN of the input checkpoint's
    weight (hand-listed names), every other tensor (norms, routers, their score-correction
    bias) is the input's bit for bit, and the run's perplexity is transformers' own of the export."""
    from conftest import eval_windows, read_checkpoint, reference_ppl
    from safetensors.torch import load_file

    from shardquant.algorithms.rtn import quantize_rtn
    from shardquant.calib.steps import quant_spec
    from shardquant.pipeline import quantize

    src = moe_models["deepseek_v3"]
    cfg = _moe_run(src, texts, tmp_path / "out", method="rtn")
    report = quantize(cfg, show_progress=False)
    original = load_file(src / "model.safetensors")
    exported = read_checkpoint(tmp_path / "out" / "model")
    assert exported.keys() == original.keys()
    quantized = {n for n in original if _QUANTIZED.fullmatch(n)}
    assert len(quantized) == _N_QUANTIZED["deepseek_v3"]
    assert "model.layers.0.mlp.gate_proj.weight" in quantized and "model.layers.1.mlp.gate.weight" not in quantized
    spec = quant_spec(cfg.quant)
    for name, t in original.items():
        want = quantize_rtn(t, spec).dequantize() if name in quantized else t
        assert torch.equal(exported[name], want), name
    ppl = reference_ppl(tmp_path / "out" / "model", eval_windows(tmp_path / "out" / "model", texts))
    assert report["ppl"]["quantized"] == pytest.approx(ppl, rel=1e-5)


def test_deepseek_v3_router_stays_float32_in_bfloat16(moe_models, texts, tmp_path):
    """In bfloat16 every tensor of the tiny DeepSeek-V3 loads in the dtype transformers gives
    it (its router weight and score-correction bias stay float32: the routing depends on small
    bias differences), and a `method: none` export keeps them so: float32 and the input's
    values, every other float tensor the input's in bfloat16."""
    from conftest import read_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    src_dir = moe_models["deepseek_v3"]
    src = ModelSource(src_dir, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16).state_dict()
    block = src.block(1)
    ours = {f"model.layers.1.{k}": v for k, v in block.state_dict().items()}
    assert {k: v.dtype for k, v in ours.items() if ".experts." not in k} == {
        k: v.dtype for k, v in ref.items() if k.startswith("model.layers.1.") and ".experts." not in k}
    assert ours["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    src.release(block)
    cfg = _moe_run(src_dir, texts, tmp_path / "out", method="none").model_dump()
    cfg["model"]["dtype"] = "bfloat16"
    quantize(build_config(cfg), show_progress=False)
    original = load_file(src_dir / "model.safetensors")
    exported = read_checkpoint(tmp_path / "out" / "model")
    for name, t in original.items():
        keep = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        assert torch.equal(exported[name], t if keep else t.to(torch.bfloat16)), name


def test_awq_folds_exactly_into_mla_attention(moe_models):
    """AWQ's folding on the tiny DeepSeek-V3's dense block: random scales folded into
    input_layernorm (q_a_proj, kv_a_proj_with_mqa), q_a_layernorm (q_b_proj), kv_a_layernorm
    (kv_b_proj), post_attention_layernorm and up_proj leave the block's output where it was
    and really change those norms; o_proj is refused (kv_b_proj's rows are not its inputs)."""
    from shardquant.calib.steps import fold_scales, scale_blocker
    from shardquant.model.forward import BlockRunner

    src = ModelSource(moe_models["deepseek_v3"])
    runner = BlockRunner(src.adapter, src.skeleton.config, src.rotary())
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, src.config.hidden_size, generator=gen)
    block = src.block(0)
    before = runner.forward(block, 0, hidden)
    norms = {n: p.clone() for n, p in block.named_parameters() if "norm" in n}
    skipped = []
    for g in src.block_groups(0):
        if (reason := scale_blocker(block, g)) is not None:
            skipped.append(reason)
            continue
        fold_scales(block, g, torch.exp(torch.randn(block.get_submodule(g.linears[0]).in_features, generator=gen)))
    torch.testing.assert_close(runner.forward(block, 0, hidden), before, rtol=1e-4, atol=1e-4)
    assert [r.split(":")[0] for r in skipped] == ["attn_out"]
    after = dict(block.named_parameters())
    assert all(not torch.equal(p, after[n]) for n, p in norms.items()), sorted(norms)
    assert len(norms) == 4


@pytest.mark.parametrize("q_lora_rank", [96, None])
def test_deepseek_v3_plan_shapes_equal_transformers_modules(q_lora_rank):
    """From config.json alone (`shardquant plan`'s `model_shape`, the adapter resolved by
    `q_lora_rank`: q_a/q_b or one q_proj) the linears of a dense and a sparse DeepSeek-V3
    block, and their (out, in), are those of transformers' own modules (meta device, the
    checkpoint's per-expert layout), and so are the norms' sizes."""
    from moe_fixtures import tiny_moe_config
    from transformers import AutoModelForCausalLM

    from shardquant.model.adapters import get_adapter
    from shardquant.model.experts import checkpoint_layout
    from shardquant.tools.plan import model_shape

    config = tiny_moe_config("deepseek_v3", layers=3)
    config.q_lora_rank = q_lora_rank
    raw = json.loads(config.to_json_string())
    with torch.device("meta"):
        model = checkpoint_layout(AutoModelForCausalLM.from_config(config), get_adapter("deepseek_v3", config=raw))
    shape = model_shape(raw)
    dims = shape.dims()
    for i, n_experts in ((0, 0), (1, 8)):
        block = model.model.layers[i]
        linears = {n: tuple(m.weight.shape) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert shape.adapter.linear_shapes(dims, n_experts) == linears
        assert ("self_attn.q_proj" in linears) == (q_lora_rank is None)
        norms = {n.removesuffix(".weight"): p.shape[0] for n, p in block.named_parameters() if "norm" in n}
        assert {n: dims[d] for n, d in shape.adapter.norms} == norms
    # A config.json without the key: transformers' default decides (DeepseekV3Config's is set).
    from transformers import DeepseekV3Config

    default = get_adapter("deepseek_v3", config={}).groups[0].linears[0]
    assert default == ("self_attn.q_a_proj" if DeepseekV3Config().q_lora_rank is not None else "self_attn.q_proj")
