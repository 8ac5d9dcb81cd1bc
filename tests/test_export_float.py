"""Float weight schemes (`quant.scheme` NVFP4A16, MXFP4A16, FP8_DYNAMIC / FP8_BLOCK weights only),
W8A16 and the weight-activation presets (W8A8 with SmoothQuant, FP8, FP8_DYNAMIC, NVFP4, MXFP4), exported as compressed-tensors writes them and reloaded by transformers +
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
import warnings

import pytest
import torch
from conftest import eval_windows, model_ppl, read_checkpoint, run_config, save_tiny_model

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
# Weight-activation presets, one per stored format: (quant, wide, the reload route, format).
# float32: transformers' default route, on which compressed-tensors quantizes the inputs itself;
# dequantize: FP4's float32 route (see above), which drops the scheme, so the test quantizes the
# inputs as the config says (`calib.inputs`, the library's own functions).
ACT_CASES = {
    "w8a8-sq": ({"method": "gptq", "scheme": "W8A8", "smoothquant": 0.5}, False, torch.float32, "int-quantized"),
    "fp8-dynamic": ({"method": "gptq", "scheme": "FP8_DYNAMIC"}, False, torch.float32, "float-quantized"),
    "fp8-static": ({"method": "rtn", "scheme": "FP8"}, False, torch.float32, "float-quantized"),
    "nvfp4-act": ({"method": "gptq", "scheme": "NVFP4"}, False, "dequantize", "nvfp4-pack-quantized"),
    "mxfp4-act": ({"method": "rtn", "scheme": "MXFP4"}, False, "dequantize", "mxfp4-pack-quantized"),
}
# Exported for `shardquant eval` only: a block linear left in full precision (config.json's `ignore`).
EVAL_CASES = {
    "fp8-static-ignore": ({"method": "rtn", "scheme": "FP8", "ignore": ["mlp.down_proj"]}, False, torch.float32,
                          "float-quantized"),
}

# FP8_BLOCK on the one linear whose inputs are a multiple of its 128 columns (down_proj: 128),
# the others (64 inputs) listed in quant.ignore, as on a real model with such linears.
PARTIAL_CASES = {
    "fp8-block-down": ({"method": "gptq", "scheme": "FP8_BLOCK",
                        "ignore": ["lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]},
                       False, torch.float32, "float-quantized"),
}

# Exported for the byte check of codes stored as they are only: int4 weights in int8, FP8 inputs.
CODE_CASES = {
    "w4afp8": ({"method": "rtn", "scheme": "W4AFP8"}, True, torch.float32, "int-quantized"),
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", hidden=128, inter=256, layers=2)


@pytest.fixture(scope="module")
def exported(tiny_models, wide_model, texts, tmp_path_factory):
    cache: dict = {}

    def export(case: str, fmt: str):
        if (case, fmt) not in cache:
            quant, wide, _, _ = {**CASES, **ACT_CASES, **EVAL_CASES, **CODE_CASES, **PARTIAL_CASES}[case]
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
    return model_ppl(model, eval_windows(model_dir, texts, n=EVAL["n_samples"], seq_len=EVAL["seq_len"]))


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
    assert "activations:" not in (ct_dir.parent / "report.md").read_text()
    if q.kind != "int":
        assert CT_FLOAT_FORMATS[q.kind] == fmt


INPUTS_IN_WORDS = {"w8a8-sq": "int8 dynamic per token", "fp8-static": "fp8 static per tensor",
                   "nvfp4-act": "fp4 dynamic per group of 16 (static global scale)",
                   "mxfp4-act": "fp4 dynamic per group of 32"}


@pytest.mark.parametrize("case", ["nvfp4", "mxfp4", "fp8", "fp8-block", *INPUTS_IN_WORDS])
def test_layout_inspect_and_library_config(case, exported, tmp_path):
    """The tensors are the layout's (what plan sizes, to the byte), inspect reads them (and says
    how inputs are quantized), and the library's ModelCompressor writes the same config (the
    library infers the same format)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    quant, _, _, fmt = {**CASES, **ACT_CASES}[case]
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
    assert summary.format == "compressed-tensors" and (summary.scheme.kind or "int") == q.kind
    assert summary.scheme.activations == INPUTS_IN_WORDS.get(case)
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


@pytest.mark.parametrize("case", ["fp8", "fp8-block", "w8a8-sq", "fp8-dynamic", "fp8-static", "w4afp8",
                                  "nvfp4", "mxfp4", "nvfp4-act", "mxfp4-act"])
def test_stored_codes_are_the_library_compressors_bytes(case, exported):
    """Every format's tensors, written from the solved codes (FP4's packed by us), are byte for
    byte what the library's own compressor writes from the fake export's dequantized weight with
    the stored scales (decompressed by the compressor for FP4) and input parameters: its keys,
    dtypes and shapes too."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, _, _, fmt = {**CASES, **ACT_CASES, **CODE_CASES}[case]
    ct_dir, _ = exported(case, "compressed-tensors")
    t, fake = read_checkpoint(ct_dir), read_checkpoint(exported(case, "fake")[0])
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    names = sorted(k.removesuffix(".weight_scale") for k in t if k.endswith(".weight_scale"))
    assert len(names) == 7 * json.loads((ct_dir / "config.json").read_text())["num_hidden_layers"]
    for name in names:
        stored = {k.removeprefix(name + "."): v for k, v in t.items() if k.startswith(name + ".")}
        state = {k: v for k, v in stored.items() if k not in ("weight", "weight_packed")}
        if "weight_packed" in stored:  # FP4: the compressor takes the scales as floats
            state["weight_scale"] = compressor._decompress_scale(state["weight_scale"], torch.float32)
        lib = compressor.compress({**state, "weight": fake[f"{name}.weight"]}, scheme)
        assert sorted(lib) == sorted(stored), name
        for key, value in lib.items():
            assert value.dtype == stored[key].dtype and value.shape == stored[key].shape, (name, key)
            assert torch.equal(value.view(torch.uint8), stored[key].view(torch.uint8)), (name, key)


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


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_weight_only_formats_refuse_activation_schemes(fmt, tiny_models, texts, tmp_path):
    from shardquant.errors import UserError
    from shardquant.prepare import prepare

    raw = run_config(tiny_models["llama"], texts, tmp_path / "o", export={"format": fmt})
    raw["quant"] = {"method": "rtn", "scheme": "W8A8"}
    with pytest.raises(UserError, match=f"export.format: '{fmt}' holds weight-only schemes, but quant.scheme W8A8"):
        prepare(build_config(raw))


def test_pipeline_stages_refuse_activation_schemes(tmp_path):
    from shardquant.errors import UserError

    raw = {"model": {"path": str(tmp_path)}, "quant": {"scheme": "FP8_DYNAMIC", "method": "rtn"},
           "calib": {"propagate": "fp"}, "cluster": {"backend": "ray", "workers": 2}}
    with pytest.raises(UserError, match="calib.propagate: fp on ray runs pipeline stages"):
        build_config(raw)


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


@pytest.mark.parametrize("case", ["nvfp4", "mxfp4", "fp8", "fp8-block", "w8a16", *INPUTS_IN_WORDS])
def test_plan_sizes_the_export(case, exported):
    """`shardquant plan`'s checkpoint bytes are the real export's, for every float format and
    weight-activation preset (with their input tensors)."""
    from shardquant.tools.plan import plan_from_config
    from shardquant.tools.plan_text import render

    _, report = exported(case, "compressed-tensors")
    plan = plan_from_config(build_config(report["config"]))
    assert report["export"]["bytes"] == plan.checkpoint_bytes
    q = QuantConfig.model_validate({**CASES, **ACT_CASES}[case][0])
    assert (f"inputs {q.activations}" in render(plan)) == (case in INPUTS_IN_WORDS)


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


def _quantize_inputs_as_configured(model, model_dir) -> int:
    """Pre-hooks quantizing each quantized linear's input as config.json's `input_activations`
    say, with the checkpoint's static input tensors (`calib.inputs`: the library's functions);
    the number of linears hooked. NVFP4 weights are dequantized again by the library's
    `dequantize` in float32 (its reader rounds them to bfloat16)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from shardquant.calib.inputs import fake_quantize_input

    qc = QuantizationConfig.model_validate(json.loads((model_dir / "config.json").read_text())["quantization_config"])
    args = qc.config_groups["group_0"].input_activations
    tensors = read_checkpoint(model_dir)
    n = 0
    for name, mod in model.named_modules():
        if f"{name}.weight_packed" not in tensors:
            continue
        if f"{name}.weight_global_scale" in tensors:
            out_f, in_f = mod.weight.shape
            codes = unpack_fp4_from_uint8(tensors[f"{name}.weight_packed"], out_f, in_f, dtype=torch.float32)
            w = dequantize(x_q=codes, scale=tensors[f"{name}.weight_scale"].float(), dtype=torch.float32,
                           args=qc.config_groups["group_0"].weights, global_scale=tensors[f"{name}.weight_global_scale"])
            with torch.no_grad():
                mod.weight.copy_(w)
        params = {k: tensors[f"{name}.{k}"] for k in ("input_scale", "input_global_scale") if f"{name}.{k}" in tensors}
        mod.register_forward_pre_hook(lambda _m, a, params=params: (fake_quantize_input(a[0], args, params),))
        n += 1
    return n


@pytest.fixture(scope="module")
def served(exported, texts):
    """The perplexity of transformers + compressed-tensors' own reload of a case's export, as
    the served model computes it (None where the library's reader rounds the weights: NVFP4
    without input quantization), and without input quantization; cached per case."""
    cache: dict = {}

    def ppl(case: str, *, inputs: bool = True) -> float | None:
        if (case, inputs) not in cache:
            _, _, route, _ = {**CASES, **ACT_CASES, **EVAL_CASES, **PARTIAL_CASES}[case]
            ct_dir, _ = exported(case, "compressed-tensors")
            if not inputs or route in ("dequantize", torch.bfloat16):
                if case == "nvfp4":
                    return None
                model = load(ct_dir, torch.float32, dequantize=True)
                if inputs and case in ACT_CASES:
                    assert _quantize_inputs_as_configured(model, ct_dir) == 7 * len(model.model.layers)
            else:  # compressed-tensors' own quantized forward quantizes each linear's input
                model = load(ct_dir, route)
            cache[case, inputs] = perplexity(model, ct_dir, texts)
        return cache[case, inputs]

    return ppl


@pytest.mark.parametrize("case", list(ACT_CASES))
def test_activation_scheme_reloads_with_its_ppl(case, exported, served):
    """A weight-activation preset's export declares the preset's input activations, reloads in
    transformers + compressed-tensors, and quantizing the inputs as served gives the run's
    `ppl.quantized` (the same number on the library's own route); without the input
    quantization the reload's perplexity is further off than the tolerance."""
    from compressed_tensors.quantization import preset_name_to_scheme

    quant, _, route, fmt = ACT_CASES[case]
    ct_dir, report = exported(case, "compressed-tensors")
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == fmt and group["format"] == fmt
    want = preset_name_to_scheme(quant["scheme"], ["Linear"]).input_activations.model_dump(mode="json")
    assert group["input_activations"] == want
    assert "the quantized perplexity is measured with it" in (ct_dir.parent / "report.md").read_text()
    if route != "dequantize":
        lin = load(ct_dir, route).model.layers[0].self_attn.q_proj
        assert lin.quantization_scheme.input_activations.model_dump(mode="json") == want
    ours = report["ppl"]["quantized"]
    tol = 1e-5  # the same arithmetic: far inside the 0.2% asked for
    assert served(case) == pytest.approx(ours, rel=tol)
    plain = served(case, inputs=False)
    assert abs(plain / ours - 1) > 5 * tol, (plain, ours)


@pytest.mark.parametrize(("case", "tensor"), [("nvfp4-act", "input_global_scale"), ("fp8-static", "input_scale")])
def test_static_input_scale_is_the_calibration_absmax(case, tensor, exported, texts):
    """NVFP4's `input_global_scale` of block 0's q/k/v is 448 * 6 / max|x| over the calibration
    windows, FP8's `input_scale` max|x| / 448, x the input transformers' own forward gives
    q_proj (norm of the embedding: nothing quantized before it); the same for the three (one
    input)."""
    from transformers import AutoTokenizer


    ct_dir, report = exported(case, "compressed-tensors")
    calib = report["config"]["calib"]
    tok = AutoTokenizer.from_pretrained(ct_dir)
    wins = token_windows(tok, load_text(str(texts["calib"]), key="calib.path"), n_samples=calib["n_samples"],
                         seq_len=calib["seq_len"], seed=calib["seed"], mode="random", key="calib")
    model = load(ct_dir, torch.float32, dequantize=True)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().amax()))
    with torch.no_grad():
        model(wins)
    amax = torch.stack(seen).amax()
    want = 448.0 * 6.0 / amax if tensor == "input_global_scale" else amax / 448.0
    t = read_checkpoint(ct_dir)
    for n in ("q_proj", "k_proj", "v_proj"):
        got = t[f"model.layers.0.self_attn.{n}.{tensor}"]
        assert got.dtype == torch.float32 and got.shape == (1,)
        torch.testing.assert_close(got, want.reshape(1), rtol=1e-6, atol=0)


def _eval(checkpoint, texts, output) -> tuple[int, dict | None, str]:
    """`shardquant eval CHECKPOINT` on the run's evaluation windows: exit code, eval.json, stderr."""
    import contextlib
    import io

    from shardquant.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["eval", str(checkpoint), f"--eval.path={texts['eval']}", f"--eval.n_samples={EVAL['n_samples']}",
                   f"--eval.seq_len={EVAL['seq_len']}", f"--eval.batch_size={EVAL['batch_size']}",
                   f"--output={output}", "--quiet"])
    result = json.loads((output / "eval.json").read_text()) if rc == 0 else None
    return rc, result, err.getvalue()


EVAL_TOL = 1e-5  # eval and the run compute the same arithmetic; asked: 1e-4


@pytest.mark.parametrize("case", ["fp8", "fp8-block", "nvfp4", "mxfp4", "w8a16", *ACT_CASES, *EVAL_CASES])
def test_eval_of_the_export_is_the_runs_quantized_ppl(case, exported, served, texts, tmp_path):
    """`shardquant eval` reads every compressed-tensors format the exporter writes (weights by
    the library's own functions) and quantizes the inputs the checkpoint declares, with its
    stored static scales: the perplexity is the run's `ppl.quantized` and transformers +
    compressed-tensors' own reload's; without the input quantization it would be off by more
    than the tolerance. eval.json and stderr say how inputs were quantized. A linear the
    config ignores stays dense, its input as it is."""
    ct_dir, report = exported(case, "compressed-tensors")
    if case in EVAL_CASES:  # down_proj is ignored: a dense float weight, no scales
        assert "model.layers.1.mlp.down_proj" in json.loads((ct_dir / "config.json").read_text())[
            "quantization_config"]["ignore"]
        assert read_checkpoint(ct_dir)["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32
    rc, result, err = _eval(ct_dir, texts, tmp_path / "eval")
    assert rc == 0, err
    ours = report["ppl"]["quantized"]
    assert result["format"] == "compressed-tensors"
    assert result["ppl"] == pytest.approx(ours, rel=EVAL_TOL)
    reference = served(case)
    if reference is not None:  # NVFP4 weights only: the library's reader rounds them to bfloat16
        assert result["ppl"] == pytest.approx(reference, rel=EVAL_TOL)
    if case in (*ACT_CASES, *EVAL_CASES):
        words = {**INPUTS_IN_WORDS, "fp8-dynamic": "fp8 dynamic per token",
                 "fp8-static-ignore": "fp8 static per tensor"}[case]  # inspect's words
        assert result["input_activations"] == words
        assert err.count(f"inputs quantized as the checkpoint declares ({words})") == 1, err
        plain = served(case, inputs=False)
        assert abs(plain / result["ppl"] - 1) > 10 * EVAL_TOL, (plain, result["ppl"])
    else:
        assert "input_activations" not in result and "inputs quantized" not in err


def test_fp8_block_on_the_linears_it_fits(exported, served, texts, tmp_path):
    """FP8_BLOCK with the linears whose inputs its 128-column blocks do not divide ignored:
    the run is not refused, down_proj is stored in one partial 128 x 128 block (64 rows), the
    others stay dense, and transformers + compressed-tensors' reload and `shardquant eval`
    give the run's `ppl.quantized`, inputs quantized per group of 128 as served."""
    ct_dir, report = exported("fp8-block-down", "compressed-tensors")
    tensors = read_checkpoint(ct_dir)
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.weight"].dtype == torch.float8_e4m3fn and tuple(tensors[f"{down}.weight"].shape) == (64, 128)
    assert tuple(tensors[f"{down}.weight_scale"].shape) == (1, 1)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in tensors
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["block_structure"] == [128, 128]
    assert "model.layers.0.self_attn.q_proj" in qc["ignore"] and down not in qc["ignore"]
    ours = report["ppl"]["quantized"]
    assert served("fp8-block-down") == pytest.approx(ours, rel=EVAL_TOL)
    assert abs(served("fp8-block-down", inputs=False) / ours - 1) > 10 * EVAL_TOL
    rc, result, err = _eval(ct_dir, texts, tmp_path / "eval")
    assert rc == 0, err
    assert result["ppl"] == pytest.approx(ours, rel=EVAL_TOL)


def _copy_export(src, dst, edit=None, drop: str | None = None):
    """A copy of an export with its quantization_config edited in place (`edit`) and one tensor
    dropped from the index (`drop`)."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if edit is not None:
        edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    if drop is not None:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        del index["weight_map"][drop]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_eval_refuses_what_it_cannot_simulate(exported, texts, tmp_path):
    """A config group eval cannot read or simulate, or a static input scale missing, is one
    line naming config.json (or the tensor) and what is wrong, exit 2, and no output."""
    ct_dir, _ = exported("fp8-static", "compressed-tensors")
    where = "quantization_config.config_groups.group_0"

    def group(**change):
        return lambda qc: qc["config_groups"]["group_0"].update(change)

    def inputs(**change):
        return lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(change)

    cases = {
        "format": (group(format="marlin-24"), None, f"{where}: format 'marlin-24' is not read (readable: "),
        "weights": (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="attn_head"), None,
                    f"{where}.weights.strategy 'attn_head' is not read in format 'float-quantized' (readable: "
                    "tensor, channel, group, block)"),
        "inputs": (inputs(strategy="group", group_size=16), None,
                   f"{where}.input_activations.strategy 'group' is not read for static inputs (readable: tensor)"),
        "library": (inputs(strategy="channel"), None,
                    "quantization_config: Using channel strategy is not supported for activation quantization"),
        "outputs": (group(output_activations={"num_bits": 8, "type": "float"}), None,
                    f"{where}.output_activations: output activation quantization is not simulated"),
        "kv": (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), None,
               "quantization_config.kv_cache_scheme (KV-cache quantization) is not simulated"),
        "invalid": (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="diagonal"), None,
                    f"{where}.weights.strategy: Value error, 'diagonal' is not a valid QuantizationStrategy"),
        "type": (lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="int"), None,
                 f"{where}: int weights cannot be stored as format 'float-quantized'"),
        "weight_scale": (None, "model.layers.0.mlp.up_proj.weight_scale",
                         "model.path: 'model.layers.0.mlp.up_proj.weight_scale' is missing from the safetensors files "
                         "(config group group_0 quantizes 'model.layers.0.mlp.up_proj' as float-quantized)"),
        "scale": (None, "model.layers.1.self_attn.k_proj.input_scale",
                  "model.path: 'model.layers.1.self_attn.k_proj.input_scale' is missing from the safetensors files "
                  "(config group group_0 quantizes its inputs statically)"),
    }
    for name, (edit, drop, want) in cases.items():
        bad = _copy_export(ct_dir, tmp_path / name, edit, drop)
        rc, _, err = _eval(bad, texts, tmp_path / f"out-{name}")
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (name, err)
        assert want in lines[0], (name, lines[0])
        if drop is None:
            assert lines[0].startswith(f"shardquant: error: model.path: '{bad / 'config.json'}': "), lines[0]
        assert not (tmp_path / f"out-{name}" / "eval.json").exists()


def test_eval_of_mixed_config_groups_is_the_reload(exported, texts, tmp_path):
    """Two config groups of different formats and input schemes (int-quantized W8A8 mlp,
    float-quantized static FP8 attention, `mixed-precision`), each matched by its targets: eval
    quantizes each linear as its group says, as transformers + compressed-tensors' own reload
    computes it."""
    from safetensors.torch import save_file

    w8a8, _ = exported("w8a8-sq", "compressed-tensors")
    fp8, _ = exported("fp8-static", "compressed-tensors")
    mixed = _copy_export(w8a8, tmp_path / "mixed")
    for f in mixed.glob("*.safetensors*"):
        f.unlink()
    tensors = read_checkpoint(w8a8)
    tensors.update({k: v for k, v in read_checkpoint(fp8).items() if ".self_attn." in k})
    save_file(tensors, str(mixed / "model.safetensors"))
    cfg = json.loads((mixed / "config.json").read_text())
    qc = cfg["quantization_config"]
    attn = json.loads((fp8 / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    qc["config_groups"] = {"mlp": {**qc["config_groups"]["group_0"], "targets": [r"re:.*mlp\..*"]},
                           "attn": {**attn, "targets": [r"re:.*self_attn\..*"]}}
    qc["format"] = "mixed-precision"
    (mixed / "config.json").write_text(json.dumps(cfg))

    rc, result, err = _eval(mixed, texts, tmp_path / "eval")
    assert rc == 0, err
    assert result["input_activations"] == "int8 dynamic per token; fp8 static per tensor"
    model = load(mixed, torch.float32)
    assert model.model.layers[0].mlp.down_proj.quantization_scheme.input_activations.type == "int"
    assert model.model.layers[0].self_attn.o_proj.quantization_scheme.input_activations.type == "float"
    assert result["ppl"] == pytest.approx(perplexity(model, mixed, texts), rel=EVAL_TOL)


def test_eval_of_a_moe_export_is_the_runs_quantized_ppl(texts, tmp_path):
    """A mixture-of-experts W8A8 export (every expert's linears under its own name, the routers
    in `ignore`): eval reads each expert as its group says and quantizes its inputs, giving
    the run's `ppl.quantized`."""
    from moe_fixtures import save_tiny_moe

    model = save_tiny_moe(tmp_path / "qwen2_moe", "qwen2_moe", layers=2)
    raw = run_config(model, texts, tmp_path / "run", calib={"n_samples": 4, "seq_len": 32}, eval=EVAL,
                     export={"format": "compressed-tensors"})
    raw["quant"] = {"method": "rtn", "scheme": "W8A8"}
    report = quantize(build_config(raw), show_progress=False)
    qc = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.gate" in qc["ignore"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale" in read_checkpoint(tmp_path / "run" / "model")
    rc, result, err = _eval(tmp_path / "run" / "model", texts, tmp_path / "eval")
    assert rc == 0, err
    assert result["input_activations"] == "int8 dynamic per token"
    assert result["ppl"] == pytest.approx(report["ppl"]["quantized"], rel=EVAL_TOL)
