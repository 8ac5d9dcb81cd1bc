"""`export.format: awq`: AWQ GEMM tensors that a reference reader, written here from the
format's definition, turns back into exactly the `fake` export's weights; the schemes the
format cannot hold are refused before calibration. (tests/test_readers.py checks the same
checkpoints with AutoAWQ's own unpacking code.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_checkpoint, run_config, save_tiny_model

from shardquant.config import build_config
from shardquant.errors import UserError
from shardquant.pipeline import prepare, quantize

CALIB = {"n_samples": 8, "seq_len": 32}
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds element ORDER[i] of its 8


pytestmark = pytest.mark.usefixtures("one_thread")


def export(model, texts, out, fmt, quant):
    cfg = build_config(run_config(model, texts, out / fmt, quant=quant, calib=CALIB,
                                  export={"format": fmt}, eval={"enabled": False}))
    quantize(cfg, show_progress=False)
    return out / fmt / "model", read_checkpoint(out / fmt / "model")


def reference_dequantize(qweight, qzeros, scales, group):
    """AWQ GEMM read the long way: word c of row r of qweight holds outputs 8c..8c+7 of input r,
    output 8c + ORDER[i] at bits 4i; qzeros likewise per group; w = (q - z) * s."""
    in_f, words = qweight.shape
    qw = (qweight.to(torch.int64) & 0xFFFFFFFF).tolist()
    qz = (qzeros.to(torch.int64) & 0xFFFFFFFF).tolist()

    def unpack_row(row):
        out = [0] * (len(row) * 8)
        for c, word in enumerate(row):
            for i in range(8):
                out[8 * c + ORDER[i]] = (word >> (4 * i)) & 0xF
        return out

    codes = torch.tensor([unpack_row(r) for r in qw], dtype=torch.int64)  # [in, out]
    zeros = torch.tensor([unpack_row(r) for r in qz], dtype=torch.int64)  # [in / group, out]
    g = torch.arange(in_f) // group
    return ((codes - zeros[g]).float() * scales.float()[g]).t()  # [out, in]


@pytest.mark.parametrize(("family", "quant", "ignored"), [
    ("llama", {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}, []),
    ("qwen2", {"method": "rtn", "bits": 4, "group_size": 16, "symmetric": False,
               "ignore": ["lm_head", "down_proj"]}, ["mlp.down_proj"]),
], ids=["gptq4-g32-sym", "rtn4-g16-asym-ignore"])
def test_reference_reader_reproduces_fake_weights(family, quant, ignored, tiny_models, texts, tmp_path):
    _, fake = export(tiny_models[family], texts, tmp_path, "fake", quant)
    model, packed = export(tiny_models[family], texts, tmp_path, "awq", quant)
    group = quant["group_size"]

    linears = sorted(k.removesuffix(".qweight") for k in packed if k.endswith(".qweight"))
    assert len(linears) == 3 * (7 - len(ignored))
    for name in linears:
        w = fake[f"{name}.weight"]
        out_f, in_f = w.shape
        qweight, qzeros, scales = packed[f"{name}.qweight"], packed[f"{name}.qzeros"], packed[f"{name}.scales"]
        assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (in_f, out_f // 8))
        assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (in_f // group, out_f // 8))
        assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (in_f // group, out_f))
        assert f"{name}.weight" not in packed
        if quant["symmetric"]:  # symmetric is stored as zero point 8 everywhere
            assert (qzeros.to(torch.int64) & 0xFFFFFFFF == 0x88888888).all()
        assert torch.equal(reference_dequantize(qweight, qzeros, scales, group), w), name
    # Everything that is not a quantized linear (biases, norms, ignored linears) is exported as is.
    for k in fake:
        if not any(k == f"{n}.weight" for n in linears):
            assert torch.equal(packed[k], fake[k]), k
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in packed

    qc = json.loads((model / "config.json").read_text())["quantization_config"]
    not_converted = [f"model.layers.{i}.{n}" for i in range(3) for n in ignored] + ["lm_head"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": group, "bits": 4,
                  "version": "gemm", "modules_to_not_convert": not_converted}


def test_transformers_reads_the_quantization_config(tiny_models, texts, tmp_path):
    """transformers parses the config as an AWQ GEMM one (loading needs gptqmodel's kernels)."""
    from transformers import AutoConfig

    quant = {"method": "rtn", "bits": 4, "group_size": 32}
    cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / "out", quant=quant, calib=CALIB,
                                  export={"format": "awq"}, eval={"enabled": False}))
    quantize(cfg, show_progress=False)
    from transformers.utils.quantization_config import AwqConfig

    qc = AwqConfig.from_dict(AutoConfig.from_pretrained(tmp_path / "out" / "model").quantization_config)
    assert (qc.bits, qc.group_size, qc.zero_point, qc.format) == (4, 32, True, "gemm")
    assert qc.modules_to_not_convert == ["lm_head"]


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A llama whose MLP width (36) is not a multiple of 8."""
    return save_tiny_model(tmp_path_factory.mktemp("odd") / "llama", "llama", inter=36, layers=1)


@pytest.mark.parametrize(("quant", "pattern"), [
    ({"bits": 3}, r"^export\.format: 'awq' cannot hold quant\.bits=3 "),
    ({"bits": 8}, r"^export\.format: 'awq' cannot hold quant\.bits=8 "),
    ({"group_size": -1}, r"^export\.format: 'awq' cannot hold quant\.group_size=-1 "),
    ({"act_order": True, "static_groups": False}, r"^export\.format: 'awq' cannot hold quant\.act_order groups .*quant\.static_groups"),
    ({"method": "none"}, r"^export\.format: 'awq' needs quantized weights"),
])
def test_refuses_schemes_it_cannot_hold(quant, pattern, tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["qwen3"], texts, tmp_path / "out", quant=quant,
                                  export={"format": "awq"}))
    with pytest.raises(UserError, match=pattern):
        prepare(cfg)
    assert not (tmp_path / "out" / "model").exists()


def test_refuses_outputs_not_a_multiple_of_8(odd_llama, texts, tmp_path):
    cfg = build_config(run_config(odd_llama, texts, tmp_path / "out", quant={"group_size": 4},
                                  export={"format": "awq"}))
    with pytest.raises(UserError, match=r"^export\.format: 'awq' packs 8 codes .* mlp\.gate_proj is \[36, 64\]"):
        prepare(cfg)
    # Left in full precision, they need not fit the packing.
    cfg = build_config(run_config(odd_llama, texts, tmp_path / "out2", export={"format": "awq"},
                                  quant={"group_size": 4, "ignore": ["lm_head", "gate_proj", "up_proj"]}))
    plan = {s.name: s for s in prepare(cfg).exporter.block_plan(0)}
    mlp = "model.layers.0.mlp"
    for name in ("gate_proj", "up_proj"):
        assert tuple(plan[f"{mlp}.{name}.weight"].shape) == (36, 64)
        assert f"{mlp}.{name}.qweight" not in plan
    # down_proj [64, 36] is packed: [in, out / 8] codes, [in / group, out] scales.
    assert f"{mlp}.down_proj.weight" not in plan
    assert tuple(plan[f"{mlp}.down_proj.qweight"].shape) == (36, 8)
    assert tuple(plan[f"{mlp}.down_proj.scales"].shape) == (9, 64)


def test_accepts_act_order_with_static_groups(tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["qwen3"], texts, tmp_path / "out",
                                  quant={"act_order": True, "static_groups": True}, export={"format": "awq"}))
    exporter = prepare(cfg).exporter
    names = {s.name for s in exporter.block_plan(0)}
    linears = exporter.quantized_linears(0)
    assert len(linears) == 7
    for lin in linears:
        assert {f"model.layers.0.{lin}.{t}" for t in ("qweight", "qzeros", "scales")} <= names
        assert f"model.layers.0.{lin}.weight" not in names
    assert not any(n.endswith("g_idx") for n in names)  # AWQ has none: static groups need none
