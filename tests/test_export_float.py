"""Float weight schemes (`quant.scheme` NVFP4A16, MXFP4A16, FP8_DYNAMIC / FP8_BLOCK weights only)
and W8A16, exported as compressed-tensors writes them and reloaded by transformers +
compressed-tensors: the reloaded weights are the fake export's bit for bit, the logits equal,
and the perplexity is the run's `ppl.quantized` within 0.2%. `shardquant inspect` reads each
format and `plan`'s layout sizes it to the byte.

compressed-tensors 0.20's FP4 reader on transformers' default (compressed) route
(`NVFP4PackedCompressor.decompress`, also MXFP4's) unpacks into bfloat16 whatever the model's
dtype, so a float32 load fails at the first matmul (float != BFloat16). FP4 checkpoints are
therefore checked twice: on the default route in bfloat16 (against the fake export loaded in
bfloat16), and in float32 with `CompressedTensorsConfig(dequantize=True)`, which decompresses at
load time into the model's dtype."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import read_checkpoint, run_config, save_tiny_model

from shardquant.config import QuantConfig, build_config
from shardquant.data import load_text, token_windows
from shardquant.export.formats import CT_FLOAT_FORMATS, CompressedTensorsLayout
from shardquant.export.inspection import inspect_checkpoint
from shardquant.pipeline import quantize

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = {"n_samples": 8, "seq_len": 32}
EVAL = {"seq_len": 64, "n_samples": 6, "batch_size": 3}
CASES = {
    # name: (quant, wide model (dims multiples of 128), reload dtype, stored format)
    "nvfp4": ({"method": "gptq", "scheme": "NVFP4A16"}, False, torch.bfloat16, "nvfp4-pack-quantized"),
    "mxfp4": ({"method": "gptq", "scheme": "MXFP4A16"}, False, torch.bfloat16, "mxfp4-pack-quantized"),
    "mxfp4-rtn": ({"method": "rtn", "scheme": "MXFP4A16"}, False, torch.bfloat16, "mxfp4-pack-quantized"),
    "fp8": ({"method": "gptq", "scheme": "FP8_DYNAMIC", "weights_only": True}, False, torch.float32,
            "naive-quantized"),
    "fp8-block": ({"method": "gptq", "scheme": "FP8_BLOCK", "weights_only": True}, True, torch.float32,
                  "naive-quantized"),
    "w8a16": ({"method": "gptq", "scheme": "W8A16"}, True, torch.float32, "pack-quantized"),
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", hidden=128, inter=256, layers=2)


@pytest.fixture(scope="module")
def exported(tiny_models, wide_model, texts, tmp_path_factory):
    cache: dict = {}

    def export(case: str, fmt: str):
        if (case, fmt) not in cache:
            quant, wide, _, _ = CASES[case]
            out = tmp_path_factory.mktemp(f"{case}-{fmt}")
            raw = run_config(wide_model if wide else tiny_models["llama"], texts, out, calib=CALIB, eval=EVAL,
                             export={"format": fmt})
            raw["quant"] = dict(quant)
            cache[case, fmt] = (out / "model", quantize(build_config(raw), show_progress=False))
        return cache[case, fmt]

    return export


def load(model_dir, dtype, *, dequantize: bool = False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw).eval()


def assert_same_model(ref, model, *, bf16_linears: bool = False):
    """The same weights (with `bf16_linears`, the quantized linears' rounded to bfloat16, as the
    library's NVFP4 reader gives them) and, when they are exactly equal, the same logits."""
    for name, p in ref.named_parameters():
        want = p.bfloat16().float() if bf16_linears and "layers" in name and "proj" in name else p
        assert torch.equal(model.get_parameter(name), want), name
    if not bf16_linears:
        x = torch.arange(48).remainder(300).unsqueeze(0)
        with torch.no_grad():
            a, b = ref(x).logits, model(x).logits
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


def perplexity(model, model_dir, texts) -> float:
    """exp(mean next-token NLL) over the run's evaluation windows, from transformers' logits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = load_text(str(texts["eval"]), key="eval.path")
    wins = token_windows(tok, text, n_samples=EVAL["n_samples"], seq_len=EVAL["seq_len"], seed=0,
                         mode="sequential", key="eval")
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(w.unsqueeze(0)).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("case", list(CASES))
def test_reloads_as_fake_export(case, exported, texts):
    quant, _, dtype, fmt = CASES[case]
    fake_dir, fake_report = exported(case, "fake")
    ct_dir, report = exported(case, "compressed-tensors")
    assert report["ppl"]["quantized"] == pytest.approx(fake_report["ppl"]["quantized"], rel=1e-9)

    model = load(ct_dir, dtype)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))  # the default route decompresses on the first forward
    assert_same_model(load(fake_dir, dtype), model)
    if dtype != torch.float32:
        model = load(ct_dir, torch.float32, dequantize=True)
    # NVFP4's reader dequantizes into bfloat16 (value * fp8 scale / global needs more bits);
    # MXFP4's products (E2M1 times a power of two) are exact in bfloat16, so they come back whole.
    assert_same_model(load(fake_dir, torch.float32), model, bf16_linears=case == "nvfp4")
    ppl = perplexity(model, ct_dir, texts)
    assert ppl == pytest.approx(report["ppl"]["quantized"], rel=2e-3)

    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and qc["config_groups"]["group_0"]["format"] == fmt
    weights = qc["config_groups"]["group_0"]["weights"]
    q = QuantConfig.model_validate(quant)
    assert weights["num_bits"] == q.bits
    assert weights["type"] == ("int" if q.kind == "int" else "float")
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    if q.kind != "int":
        assert CT_FLOAT_FORMATS[q.kind] == fmt


@pytest.mark.parametrize("case", ["nvfp4", "mxfp4", "fp8", "fp8-block"])
def test_layout_inspect_and_library_config(case, exported, tmp_path):
    """The tensors are the layout's (what plan sizes, to the byte), inspect reads them, and the
    library's ModelCompressor writes the same config (the library infers the same format)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    quant, _, _, fmt = CASES[case]
    ct_dir, report = exported(case, "compressed-tensors")
    q = QuantConfig.model_validate(quant)
    layout = CompressedTensorsLayout(q, "float32")
    t = read_checkpoint(ct_dir)
    fake = read_checkpoint(exported(case, "fake")[0])
    cfg = json.loads((ct_dir / "config.json").read_text())
    shapes = {}
    for i in range(cfg["num_hidden_layers"]):
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{lin}"
            fake_shape = tuple(fake[f"{name}.weight"].shape)
            shapes[name] = fake_shape
            parts = layout.parts(*fake_shape)
            stored = {k.removeprefix(name + "."): v for k, v in t.items() if k.startswith(name + ".")}
            assert sorted(stored) == sorted(p.suffix for p in parts)
            for p in parts:
                v = stored[p.suffix]
                assert tuple(v.shape) == p.shape and v.numel() * v.element_size() == p.nbytes, (name, p)

    summary = inspect_checkpoint(ct_dir)
    assert summary.format == "compressed-tensors" and summary.scheme.kind == q.kind
    assert summary.scheme.bits == q.bits and summary.not_quantized == ["lm_head"]
    by_name = {lin.name: lin for lin in summary.linears}
    assert len(by_name) == 7 * cfg["num_hidden_layers"]
    for name, shape in shapes.items():
        assert by_name[name].shape == shape
        assert by_name[name].bytes == layout.linear_bytes(*shape)

    qc = cfg.pop("quantization_config")
    qconfig = QuantizationConfig.model_validate(qc)
    scheme = qconfig.config_groups["group_0"]
    assert infer_module_format(torch.nn.Linear, scheme.model_copy(update={"format": None})).value == fmt
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "config.json").write_text(json.dumps(cfg))
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp_path / "lib"))
    assert json.loads((tmp_path / "lib" / "config.json").read_text())["quantization_config"] == qc


def test_gptq_beats_rtn_end_to_end(exported):
    """On the tiny model GPTQ's perplexity is below RTN's for MXFP4 (both exported)."""
    _, gptq = exported("mxfp4", "compressed-tensors")
    _, rtn = exported("mxfp4-rtn", "compressed-tensors")
    assert gptq["ppl"]["quantized"] < rtn["ppl"]["quantized"]


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_integer_formats_refuse_float_schemes(fmt, tiny_models, texts, tmp_path):
    from shardquant.errors import UserError
    from shardquant.prepare import prepare

    raw = run_config(tiny_models["llama"], texts, tmp_path / "o", export={"format": fmt})
    raw["quant"] = {"method": "rtn", "scheme": "NVFP4A16"}
    with pytest.raises(UserError, match=f"export.format: '{fmt}' holds integer weights only, not quant.scheme NVFP4A16"):
        prepare(build_config(raw))


def test_nvfp4_global_scale_shared_by_fused_linears(exported, tiny_models):
    """q/k/v and gate/up (fused by servers) share one global scale: the library's
    generate_gparam over their original weights together; o and down have their own."""
    from compressed_tensors.quantization.utils import generate_gparam

    ct_dir, _ = exported("nvfp4", "compressed-tensors")
    t, src = read_checkpoint(ct_dir), read_checkpoint(tiny_models["llama"])
    for i in range(3):
        p = f"model.layers.{i}."
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)):
            w = torch.cat([src[f"{p}{n}.weight"] for n in group])
            want = generate_gparam(w.min(), w.max())
            for n in group:
                assert torch.equal(t[f"{p}{n}.weight_global_scale"], want), (i, n)


@pytest.mark.parametrize("case", ["nvfp4", "mxfp4", "fp8", "fp8-block", "w8a16"])
def test_plan_sizes_the_export(case, exported):
    """`shardquant plan`'s checkpoint bytes are the real export's, for every float format."""
    from shardquant.tools.plan import plan_from_config

    _, report = exported(case, "compressed-tensors")
    assert report["export"]["bytes"] == plan_from_config(build_config(report["config"])).checkpoint_bytes


def test_plan_of_a_float_scheme_imports_no_torch(tiny_models, texts, tmp_path):
    import subprocess
    import sys

    import yaml

    raw = run_config(tiny_models["llama"], texts, tmp_path / "o")
    raw["quant"] = {"method": "gptq", "scheme": "nvfp4a16"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = (
        "import sys, json, io, contextlib; from shardquant.cli import main; buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): rc = main(['plan', sys.argv[1], '--json'])\n"
        "assert rc == 0, rc; heavy = [m for m in ('torch', 'transformers', 'compressed_tensors') if m in sys.modules]\n"
        "assert not heavy, heavy; print(buf.getvalue())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True,
                         timeout=120)
    assert json.loads(out.stdout)["checkpoint_bytes"] > 0


def test_inspect_fake_float_export_names_the_kind(exported):
    summary = inspect_checkpoint(exported("mxfp4", "fake")[0])
    assert summary.format == "fake" and summary.scheme.kind == "mxfp4" and summary.scheme.group_size == 32
    assert summary.scheme.describe().startswith("mxfp4 (4-bit float), group 32")


def test_w4a16_preset_exports_todays_bytes(tiny_models, texts, tmp_path):
    """`quant.scheme: W4A16` (refined to group 32) writes the very files of the same scheme
    given by the keys alone: the default path is the preset."""
    import hashlib

    digests = []
    for name, quant in (("keys", {"method": "rtn", "bits": 4, "group_size": 32}),
                        ("preset", {"method": "rtn", "scheme": "W4A16", "group_size": 32})):
        raw = run_config(tiny_models["llama"], texts, tmp_path / name, calib=CALIB, eval={"enabled": False})
        raw["quant"] = quant
        quantize(build_config(raw), show_progress=False)
        model = tmp_path / name / "model"
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                        for f in sorted(model.iterdir()) if f.name != "manifest.json"})
    assert digests[0] == digests[1] and "config.json" in digests[0]
