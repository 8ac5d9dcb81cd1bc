"""Reusing finished stages between true-sequential passes: same result, about one forward per block."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import FAMILIES, read_checkpoint, run_config

from shardquant.calib.steps import BlockProfile, calibrate_block
from shardquant.config import build_config
from shardquant.execution.local import LocalExecutor
from shardquant.pipeline import quantize


def _run(tiny_models, texts, out, family="llama", reuse=True, **sections):
    calib = {"reuse_stages": reuse, **sections.pop("calib", {})}
    cfg = run_config(tiny_models[family], texts, out, calib=calib, export={"format": "fake"}, **sections)
    report = quantize(build_config(cfg), show_progress=False)
    return read_checkpoint(out / "model"), report


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_identical_with_and_without_reuse(family, tiny_models, texts, tmp_path, one_thread):
    """The tail is applied to the very tensor the stage would pass it, so GPTQ is bit-identical."""
    a, ra = _run(tiny_models, texts, tmp_path / "a", family, reuse=True)
    b, rb = _run(tiny_models, texts, tmp_path / "b", family, reuse=False)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert ra["ppl"]["quantized"] == rb["ppl"]["quantized"]
    assert all(blk["stage_cache_bytes"] > 0 for blk in ra["blocks"])


def _one_block(cfg, windows, tmp_path, tag):
    """Block 0 quantized through a local executor: its solved weights and its output stream."""
    ex = LocalExecutor(cfg)
    ex.setup(windows, None, do_fp_eval=False)
    ex.begin_block(0)
    src = ex.worker.source
    calibrate_block(ex, "model.layers.0", src.skeleton.get_submodule("model.layers.0"), src.adapter, cfg.quant,
                    BlockProfile())
    weights = {n: r.weight.dequantize() for n, r in ex.worker.results.items()}
    ex.end_block(str(tmp_path / f"{tag}.safetensors"))
    out = torch.cat(list(ex.worker.store.iter("calib")))
    ex.close()
    return weights, out


def _calib_windows(model_dir, texts, n=16):
    from transformers import AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = load_text(str(texts["calib"]), key="calib.path")
    return token_windows(tok, text, n_samples=n, seq_len=64, seed=0, mode="random", key="calib")


@pytest.mark.parametrize(
    "sections",
    [
        {"quant": {"method": "awq"}},
        {"quant": {"method": "awq+gptq", "bits": 3}},
        {"calib": {"propagate": "fp"}},
        {"quant": {"ignore": ["lm_head", "o_proj"]}},
        {"quant": {"ignore": ["lm_head", "down_proj"], "method": "awq"}},
        {"quant": {"scheme": "NVFP4", "group_size": 16, "smoothquant": 0.5}},
    ],
    ids=["awq", "awq+gptq", "propagate-fp", "ignore-o", "awq-ignore-down", "nvfp4-inputs-smoothquant"],
)
def test_same_block_with_and_without_reuse(sections, tiny_models, texts, tmp_path, one_thread):
    """Whatever an AWQ (or SmoothQuant) fold touches is recomputed, so every method and option
    (input quantization too) gives the same weights and block output as rerunning the block
    for each group."""
    outs = {}
    for reuse in (True, False):
        calib = {"reuse_stages": reuse, **sections.get("calib", {})}
        raw = run_config(tiny_models["llama"], texts, tmp_path / f"r{reuse}", calib=calib, export={"format": "fake"},
                         quant={**{"method": "gptq", "bits": 4, "group_size": 32}, **sections.get("quant", {})})
        outs[reuse] = _one_block(build_config(raw), _calib_windows(tiny_models["llama"], texts), tmp_path, str(reuse))
    (wa, ya), (wb, yb) = outs[True], outs[False]
    assert wa.keys() == wb.keys() and wa
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    assert torch.equal(ya, yb)


def _count_calls(block, names):
    counts = dict.fromkeys(names, 0)
    handles = []
    for n in names:
        def hook(_m, _a, _out, n=n):
            counts[n] += 1
        handles.append(block.get_submodule(n).register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("reuse", [True, False])
def test_one_forward_per_block(reuse, tiny_models, texts, tmp_path, one_thread, monkeypatch):
    """With reuse each linear runs once per calibration batch in a block's GPTQ (the passes
    only redo what changed) and a norm only where its stage really runs; without, the
    attention runs again for every later group. (Forward hooks count completed calls; an
    observation pass stops before its group runs; norms are counted where they compute.)"""
    cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / "o", calib={"reuse_stages": reuse}))
    ex = LocalExecutor(cfg)
    ex.setup(_calib_windows(tiny_models["llama"], texts), None, do_fp_eval=False)
    ex.begin_block(0)
    block = ex.worker.block
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    counts, handles = _count_calls(block, names)
    norm_calls: Counter = Counter()
    norm_forward = type(block.input_layernorm).forward

    def counting(self, *a, **kw):
        norm_calls[self] += 1
        return norm_forward(self, *a, **kw)

    monkeypatch.setattr(type(block.input_layernorm), "forward", counting)
    src = ex.worker.source
    calibrate_block(ex, "model.layers.0", src.skeleton.get_submodule("model.layers.0"), src.adapter, cfg.quant,
                    BlockProfile())
    ex.end_block(str(tmp_path / "block.safetensors"))
    for h in handles:
        h.remove()
    n = 16 // cfg.calib.batch_size
    norms = (norm_calls[block.input_layernorm], norm_calls[block.post_attention_layernorm])
    if reuse:
        assert counts == dict.fromkeys(names, n)
        assert norms == (2 * n, 2 * n)  # observing q/k/v and o; gate/up and down
    else:
        assert norms == (5 * n, 3 * n)
        # observe o, gate/up, down, then propagate: the attention 4 times, the MLP twice
        assert counts == {"self_attn.q_proj": 4 * n, "self_attn.o_proj": 3 * n, "mlp.gate_proj": 2 * n,
                          "mlp.down_proj": n}
