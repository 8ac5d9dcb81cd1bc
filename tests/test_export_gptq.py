"""`export.format: gptq`: GPTQ v1 tensors that a reference reader, written here from the
format's definition, turns back into exactly the `fake` export's weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_checkpoint, run_config

from shardquant.config import build_config
from shardquant.errors import UserError
from shardquant.pipeline import prepare, quantize

CALIB = {"n_samples": 8, "seq_len": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def export(tiny_models, texts, out, family, fmt, quant):
    cfg = build_config(run_config(tiny_models[family], texts, out / fmt, quant=quant, calib=CALIB,
                                  export={"format": fmt}, eval={"enabled": False}))
    quantize(cfg, show_progress=False)
    model = out / fmt / "model"
    return model, read_checkpoint(model)


def reference_dequantize(qweight, qzeros, scales, g_idx, bits):
    """GPTQ v1 read the long way: word i of qweight column o holds inputs
    i*per .. i*per+per-1 of output o, input i*per+k at bits k*bits; qzeros likewise along
    the outputs, holding zero - 1."""
    per, mask = 32 // bits, (1 << bits) - 1
    words_in, out_f = qweight.shape
    w = [[0] * out_f for _ in range(words_in * per)]
    qw = (qweight.to(torch.int64) & 0xFFFFFFFF).tolist()
    for i in range(words_in):
        for o in range(out_f):
            word = qw[i][o]
            for k in range(per):
                w[i * per + k][o] = (word >> (k * bits)) & mask
    codes = torch.tensor(w, dtype=torch.int64)  # [in, out]
    qz = (qzeros.to(torch.int64) & 0xFFFFFFFF).tolist()
    zeros = torch.tensor(
        [[((row[o // per] >> ((o % per) * bits)) & mask) + 1 for o in range(out_f)] for row in qz],
        dtype=torch.int64,
    )  # [n_groups, out]
    g = g_idx.long()
    return ((codes - zeros[g]).float() * scales.float()[g]).t()  # [out, in]


@pytest.mark.parametrize(("family", "quant"), [
    ("llama", {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": False}),
    ("qwen3", {"method": "rtn", "bits": 2, "group_size": -1}),
], ids=["gptq4-g32-act_order", "rtn2-channel"])
def test_reference_reader_reproduces_fake_weights(family, quant, tiny_models, texts, tmp_path):
    _, fake = export(tiny_models, texts, tmp_path, family, "fake", quant)
    model, packed = export(tiny_models, texts, tmp_path, family, "gptq", quant)
    bits, group = quant["bits"], quant["group_size"]

    linears = sorted(k.removesuffix(".qweight") for k in packed if k.endswith(".qweight"))
    assert len(linears) == 3 * 7
    for name in linears:
        w = fake[f"{name}.weight"]
        out_f, in_f = w.shape
        n_groups = 1 if group == -1 else in_f // group
        qweight, qzeros = packed[f"{name}.qweight"], packed[f"{name}.qzeros"]
        scales, g_idx = packed[f"{name}.scales"], packed[f"{name}.g_idx"]
        assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (in_f * bits // 32, out_f))
        assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (n_groups, out_f * bits // 32))
        assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (n_groups, out_f))
        assert (g_idx.dtype, tuple(g_idx.shape)) == (torch.int32, (in_f,))
        assert f"{name}.weight" not in packed
        # Symmetric: every stored zero is 2**(bits-1) - 1.
        word = sum((2 ** (bits - 1) - 1) << (k * bits) for k in range(32 // bits))
        assert (qzeros.to(torch.int64) & 0xFFFFFFFF == word).all()
        assert torch.equal(reference_dequantize(qweight, qzeros, scales, g_idx, bits), w), name
    if quant.get("act_order"):
        g = packed[f"{linears[0]}.g_idx"].long()
        assert not torch.equal(g, torch.arange(len(g)) // group), "act-order should give a non-trivial g_idx"
    # Everything that is not a quantized linear is exported as is.
    rest = {k for k in fake if not any(k == f"{n}.weight" for n in linears)}
    for k in rest:
        assert torch.equal(packed[k], fake[k]), k

    qc = json.loads((model / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": group,
        "desc_act": bool(quant.get("act_order")), "sym": True, "checkpoint_format": "gptq",
    }


@pytest.mark.parametrize(("quant", "pattern"), [
    ({"bits": 3}, r"export\.format: 'gptq' cannot hold quant\.bits=3"),
    ({"symmetric": False}, r"export\.format: 'gptq' cannot hold quant\.symmetric=false"),
    ({"ignore": ["lm_head", "o_proj"]}, r"export\.format: 'gptq' cannot leave block linears .*model\.layers\.0\.self_attn\.o_proj"),
])
def test_refuses_schemes_it_cannot_hold(quant, pattern, tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["qwen3"], texts, tmp_path / "out", quant=quant,
                                  export={"format": "gptq"}))
    with pytest.raises(UserError, match=pattern):
        prepare(cfg)
