"""`export.format: compressed-tensors`: transformers (with the compressed-tensors package) loads
the packed checkpoint, and it computes exactly what the `fake` export of the same run does."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import yaml
from conftest import read_checkpoint, run_config

from shardquant.cli import main
from shardquant.config import QuantConfig, build_config
from shardquant.data import load_text, token_windows
from shardquant.errors import UserError
from shardquant.pipeline import prepare, quantize

# Both exports come from identical runs (same windows, same solver), and both readers compute
# (code - zero) * scale in float32, so the decompressed weights are bit-identical; logits are
# compared with a tolerance only to absorb kernel-level nondeterminism.
LOGIT_ATOL = 1e-5


CALIB = {"n_samples": 8, "seq_len": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_models, texts, tmp_path_factory):
    """export(family, fmt, quant) -> (model dir, report), each distinct run done once per module."""
    cache: dict = {}

    def export(family: str, fmt: str, quant: dict):
        key = (family, fmt, json.dumps(quant, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{fmt}")
            cfg = build_config(run_config(
                tiny_models[family], texts, out, quant=quant, calib=CALIB,
                export={"format": fmt}, eval={"enabled": False},
            ))
            cache[key] = (out / "model", quantize(cfg, show_progress=False))
        return cache[key]

    return export


def windows(model_dir, texts, n=3, seq_len=32) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = load_text(str(texts["eval"]), key="eval.path")
    return token_windows(tok, text, n_samples=n, seq_len=seq_len, seed=0, mode="sequential", key="eval")


def load(model_dir, *, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        # "the model already has a quantization_config": only `dequantize` is taken from ours.
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


SYM_G32 = {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}
ASYM_G32 = {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "ignore": ["lm_head", "down_proj"]}
CASES = [
    # family, quant overrides, load with dequantize=True (see the asymmetric note below)
    ("llama", SYM_G32, False),
    ("qwen3", ASYM_G32, True),
    # act-order per channel: one group, so g_idx stays trivial without static groups.
    ("llama", {"method": "gptq", "bits": 8, "group_size": -1, "symmetric": False, "act_order": True}, True),
    ("qwen3", {"method": "gptq", "bits": 2, "group_size": 32, "symmetric": True, "act_order": True, "static_groups": True}, False),
]


@pytest.mark.parametrize(("family", "quant", "dequantize"), CASES, ids=lambda v: "-".join(
    f"{k}={x}" for k, x in v.items() if k != "ignore") if isinstance(v, dict) else str(v))
def test_transformers_loads_same_model_as_fake(family, quant, dequantize, exported, texts):
    """Asymmetric checkpoints load with `dequantize=True`: transformers' default (compressed)
    route under compressed-tensors 0.20 creates an unpacked [out, n_groups] zero point on the
    meta device, while the library's own writer (and vLLM) use the packed
    [out * bits / 32, n_groups] int32 one that we write; the library's own asymmetric
    checkpoints fail that route the same way."""
    fake_dir, _ = exported(family, "fake", quant)
    ct_dir, report = exported(family, "compressed-tensors", quant)
    assert report["export"]["format"] == "compressed-tensors"

    ref, model = load(fake_dir), load(ct_dir, dequantize=dequantize)
    with torch.no_grad():
        for w in windows(ct_dir, texts):
            a = ref(w.unsqueeze(0)).logits
            b = model(w.unsqueeze(0)).logits  # the first forward decompresses (default route)
            assert torch.allclose(a, b, rtol=0, atol=LOGIT_ATOL), (a - b).abs().max()
    # The decompressed weights are the fake export's, bit for bit.
    fake_params = dict(ref.named_parameters())
    for name, p in fake_params.items():
        assert torch.equal(model.get_parameter(name), p), name

    # Layout and config.
    t = read_checkpoint(ct_dir)
    bits, group = quant["bits"], quant["group_size"]
    q = "model.layers.0.self_attn.q_proj"
    out_f, in_f = fake_params[f"{q}.weight"].shape
    n_groups = 1 if group == -1 else in_f // group
    assert f"{q}.weight" not in t
    assert (t[f"{q}.weight_packed"].dtype, t[f"{q}.weight_packed"].shape) == (torch.int32, (out_f, in_f * bits // 32))
    assert (t[f"{q}.weight_scale"].dtype, t[f"{q}.weight_scale"].shape) == (torch.float32, (out_f, n_groups))
    assert t[f"{q}.weight_shape"].dtype == torch.int64
    assert t[f"{q}.weight_shape"].tolist() == [out_f, in_f]
    if quant["symmetric"]:
        assert f"{q}.weight_zero_point" not in t
    else:
        zp = t[f"{q}.weight_zero_point"]
        assert (zp.dtype, zp.shape) == (torch.int32, (out_f * bits // 32, n_groups))
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, quant["symmetric"], "int")
    assert weights["strategy"] == ("channel" if group == -1 else "group")
    assert weights.get("group_size") == (None if group == -1 else group)
    resolved = QuantConfig.model_validate(quant)  # act-order with static groups is the default
    assert weights.get("actorder") == ("weight" if resolved.act_order else None)
    ignored = [f"model.layers.{i}.mlp.down_proj" for i in range(3)] if "ignore" in quant else []
    assert qc["ignore"] == [*ignored, "lm_head"]
    for name in ignored:
        assert torch.equal(t[f"{name}.weight"], fake_params[f"{name}.weight"])


def test_tensors_and_config_are_what_the_library_writes(exported, tmp_path):
    """compressed-tensors' own compressor, given the dequantized weight and our qparams, writes
    the same tensors; its ModelCompressor writes the same quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import (
        PackedQuantizationCompressor,
        unpack_from_int32,
    )
    from compressed_tensors.quantization import QuantizationConfig

    fake_dir, _ = exported("qwen3", "fake", ASYM_G32)
    ct_dir, _ = exported("qwen3", "compressed-tensors", ASYM_G32)
    config = json.loads((ct_dir / "config.json").read_text())
    ours = config.pop("quantization_config")
    qconfig = QuantizationConfig.model_validate(ours)
    scheme = qconfig.config_groups["group_0"]

    fake, t = read_checkpoint(fake_dir), read_checkpoint(ct_dir)
    for lin in ("self_attn.k_proj", "mlp.up_proj"):
        name = f"model.layers.1.{lin}"
        w = fake[f"{name}.weight"]
        zero = unpack_from_int32(t[f"{name}.weight_zero_point"], 4, w.shape[:1] + t[f"{name}.weight_scale"].shape[1:], packed_dim=0)
        lib = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": t[f"{name}.weight_scale"], "weight_zero_point": zero}, scheme
        )
        assert sorted(lib) == sorted(k.removeprefix(f"{name}.") for k in t if k.startswith(f"{name}."))
        for key, value in lib.items():
            assert value.dtype == t[f"{name}.{key}"].dtype, key
            assert torch.equal(value, t[f"{name}.{key}"]), key

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "config.json").write_text(json.dumps(config))
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp_path / "lib"))
    written = json.loads((tmp_path / "lib" / "config.json").read_text())
    assert written.pop("quantization_config") == ours
    assert written == config


def test_packed_checkpoint_size(exported):
    """The quantized linears take bits/16 of their fp16 bytes, plus one scale per group."""
    ct_dir, report = exported("llama", "compressed-tensors", SYM_G32)
    t = read_checkpoint(ct_dir)
    packed = {k: v for k, v in t.items() if k.endswith(".weight_packed")}
    fp16_bytes = sum(2 * int(t[k.replace("_packed", "_shape")].prod()) for k in packed)
    packed_bytes = sum(v.numel() * 4 for v in packed.values())
    assert packed_bytes * 16 == fp16_bytes * 4
    linear_bytes = sum(
        v.numel() * v.element_size() for k, v in t.items()
        if k.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_shape")
    )
    # 4 bits + a float32 scale per 32 weights = 5 bits per weight, plus 16 bytes per linear.
    assert linear_bytes / fp16_bytes == pytest.approx(5 / 16, rel=0.01)
    assert report["export"]["bytes"] == sum(v.numel() * v.element_size() for v in t.values())


@pytest.mark.parametrize(("quant", "pattern"), [
    ({"bits": 3}, r"export\.format: 'compressed-tensors' cannot hold quant\.bits=3"),
    ({"act_order": True, "static_groups": False, "group_size": 32}, r"export\.format: 'compressed-tensors' cannot hold quant\.act_order groups .*quant\.static_groups"),
    ({"method": "none"}, r"export\.format: 'compressed-tensors' needs quantized weights, but quant\.method is 'none'"),
])
def test_refuses_schemes_it_cannot_hold(quant, pattern, tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / "out", quant=quant,
                                  export={"format": "compressed-tensors"}))
    with pytest.raises(UserError, match=pattern):
        prepare(cfg)


def test_bad_scheme_exits_2_with_one_line(tiny_models, texts, tmp_path, capsys):
    out = tmp_path / "out"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_models["qwen3"], texts, out, quant={"bits": 3},
                                              export={"format": "compressed-tensors"})))
    code = main(["quantize", str(path), "--quiet"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and re.search(r"export\.format: 'compressed-tensors' cannot hold quant\.bits=3", lines[0])
    assert not (out / "model").exists()
