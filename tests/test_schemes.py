"""`quant.scheme` presets and the float weight quantizers, against compressed-tensors' own
presets, qparams and quantize/dequantize."""

from __future__ import annotations

import pytest

from shardquant.config import QuantConfig
from shardquant.errors import UserError
from shardquant.presets import PRESETS

ct_scheme = pytest.importorskip("compressed_tensors.quantization.quant_scheme")


# --- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_table_matches_library(name):
    """Every row of the torch-free table says what the library's preset of that name holds."""
    lib = ct_scheme.preset_name_to_scheme(name, ["Linear"])
    p, w = PRESETS[name], lib.weights
    assert (p.weight_type, p.bits, p.strategy, p.symmetric) == (w.type, w.num_bits, w.strategy, w.symmetric)
    if w.strategy == "block":
        assert [p.block_rows, p.group_size] == list(w.block_structure)
    else:
        assert p.group_size == (w.group_size or -1) and p.block_rows == 1
    scale = {None: "float", "torch.float8_e4m3fn": "fp8", "torch.uint8": "e8m0"}[
        None if w.scale_dtype is None else str(w.scale_dtype)]
    assert p.scale == scale
    assert (p.activations is None) == (lib.input_activations is None)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.activations])
def test_preset_input_tensors_are_the_library_parameters(name):
    """The calibrated input tensors a preset stores (`Preset.input_params`, which plan sizes and
    `calib.inputs.static_params` writes) are the input parameters the library registers on a
    linear for it, less the zero point its compressors drop for symmetric inputs."""
    import torch
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    from shardquant.calib.inputs import input_args, static_params

    lin = torch.nn.Linear(64, 32, bias=False)
    initialize_module_for_quantization(lin, ct_scheme.preset_name_to_scheme(name, ["Linear"]))
    registered = {n for n, _ in lin.named_parameters() if n.startswith("input_") and n != "input_zero_point"}
    assert set(PRESETS[name].input_params) == registered
    q = QuantConfig(scheme=name, method="rtn", group_size=PRESETS[name].group_size)
    got = static_params(input_args(q), torch.tensor([0.5, -3.0]), torch.bfloat16)
    assert set(got) == registered
    for k, v in got.items():
        assert v.shape == getattr(lin, k).shape and v.dtype == (torch.float32 if "global" in k else torch.bfloat16)


def test_issue_presets_all_known():
    """The presets issue 19 names exist in the installed library and in the table."""
    wanted = ["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "NVFP4",
              "MXFP4A16", "MXFP4", "W4AFP8"]
    assert all(ct_scheme.is_preset_scheme(n) for n in wanted)
    assert set(wanted) == set(PRESETS)


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scheme_objects_are_the_library_presets(name, method):
    """quantization_scheme gives the library's own preset (plus actorder: weight for GPTQ)."""
    from compressed_tensors.quantization import QuantizationScheme

    from shardquant.schemes import quantization_scheme

    got = quantization_scheme(QuantConfig(scheme=name.lower(), method=method))
    ref = ct_scheme.preset_name_to_scheme(name, ["Linear"])
    if method == "gptq":
        ref.weights.actorder = "weight"
    assert isinstance(got, QuantizationScheme) and got == ref


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("method", "act_order"), [("rtn", False), ("gptq", True), ("gptq", False), ("awq", False)])
def test_refined_preset_is_the_integer_args_of_the_keys(bits, group, symmetric, method, act_order):
    """The integer path's config (no preset): the refined W4A16 preset equals the args built
    from the keys alone, as the exporter built them before presets (so its config.json is
    unchanged)."""
    from compressed_tensors.quantization import QuantizationArgs

    from shardquant.schemes import quantization_scheme

    q = QuantConfig(bits=bits, group_size=group, symmetric=symmetric, method=method, act_order=act_order)
    kw: dict = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False}
    kw.update({"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group})
    if method == "gptq" and act_order:
        kw["actorder"] = "weight"
    got, want = quantization_scheme(q).weights, QuantizationArgs(**kw)
    assert got == want and got.model_dump_json() == want.model_dump_json()


def test_weights_only_drops_activations():
    from shardquant.schemes import quantization_scheme

    got = quantization_scheme(QuantConfig(scheme="FP8_DYNAMIC", weights_only=True, method="rtn"))
    ref = ct_scheme.preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert got.weights == ref.weights and got.input_activations is None and ref.input_activations is not None


def test_no_scheme_is_todays_default():
    """No preset: the explicit keys as before; the scheme object is W4A16 refined by them."""
    from shardquant.schemes import quantization_scheme

    q = QuantConfig()
    assert (q.scheme, q.bits, q.group_size, q.symmetric, q.kind) == (None, 4, 128, True, "int")
    w = quantization_scheme(QuantConfig(bits=8, group_size=-1, symmetric=False, method="rtn")).weights
    assert (w.num_bits, w.strategy, w.group_size, w.symmetric, w.type) == (8, "channel", None, False, "int")


def test_explicit_keys_refine_integer_presets():
    q = QuantConfig(scheme="W8A16", group_size=64, symmetric=False)
    assert (q.bits, q.group_size, q.symmetric) == (8, 64, False)
    q = QuantConfig(scheme="W8A8", weights_only=True)
    assert (q.bits, q.group_size, q.symmetric, q.kind) == (8, -1, True, "int")
    q = QuantConfig(scheme="NVFP4A16", method="rtn")
    assert (q.bits, q.group_size, q.kind) == (4, 16, "nvfp4")
    assert QuantConfig(scheme="MXFP4A16").kind == "mxfp4"
    assert QuantConfig(scheme="FP8_BLOCK", weights_only=True).kind == "fp8"


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"scheme": "W5A5"}, "quant.scheme: unknown preset 'W5A5'"),
        ({"scheme": "W8A16", "bits": 4}, "quant.bits: 4 contradicts quant.scheme W8A16 (8-bit weights)"),
        ({"scheme": "NVFP4A16", "group_size": 32}, "quant.group_size: 32 contradicts quant.scheme NVFP4A16"),
        ({"scheme": "MXFP4A16", "symmetric": False}, "quant.symmetric: float scheme MXFP4A16 is symmetric only"),
        ({"scheme": "W8A8", "method": "awq"}, "quant.method: awq is for weight-only schemes, and W8A8 also quantizes"),
        ({"scheme": "W8A8", "symmetric": False}, "quant.symmetric: W8A8 quantizes activations too"),
        ({"smoothquant": 0.5}, "quant.smoothquant: needs a quant.scheme that quantizes input activations"),
        ({"scheme": "FP8_DYNAMIC", "weights_only": True, "smoothquant": 0.5}, "quant.smoothquant: needs a quant.scheme"),
        ({"scheme": "W8A8", "smoothquant": 1.0}, "quant.smoothquant: "),
        ({"scheme": "NVFP4A16", "method": "awq"}, "quant.method: awq is not implemented for float scheme"),
        ({"scheme": "MXFP4A16", "mse": True}, "quant.mse: the range search is for integer schemes"),
        ({"weights_only": True}, "quant.weights_only: needs quant.scheme"),
    ],
)
def test_contradictions_are_user_errors(tmp_path, quant, message):
    """A contradiction is one UserError line naming the key."""
    from shardquant.config import build_config

    with pytest.raises(UserError) as e:
        build_config({"model": {"path": str(tmp_path)}, "quant": quant})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --- weight quantizers against the library ---------------------------------------------

torch = pytest.importorskip("torch")
ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_utils = pytest.importorskip("compressed_tensors.quantization.utils")

from shardquant.algorithms import floatq  # noqa: E402
from shardquant.algorithms.quantizer import QuantSpec  # noqa: E402
from shardquant.algorithms.rtn import quantize_rtn  # noqa: E402


def edge_weight(out_f: int = 200, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    """Random weights with edge rows: all zeros, one outlier, an all-equal group (positive and
    negative), entries that land in FP8's subnormals, exact E2M1 ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[0] = 0
    w[1, 7] = 50.0
    w[2, :32] = 0.3
    w[3, 32:64] = -0.7
    w[4] = torch.rand(in_f, generator=g) * 0.0135 + 0.001  # |w / scale| below 2**-6: FP8 subnormals
    w[4, 0] = 448.0
    ties = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0, 0.0, 1.0, 3.0, -6.0])
    w[5, :32] = ties.repeat(2)  # mxfp4 group max 6 -> scale 1: the entries are exact midpoints
    w[6, 64:] = 0
    return w


def library_args(name: str):
    return ct_scheme.preset_name_to_scheme(name, ["Linear"]).weights


def grouped_minmax(w: torch.Tensor, glen: int):
    x = w.reshape(w.shape[0], -1, glen)
    return x.amin(-1), x.amax(-1)


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16"])
def test_fp4_matches_library(name):
    w = edge_weight()
    args = library_args(name)
    spec = floatq.FloatSpec.nvfp4() if name == "NVFP4A16" else floatq.FloatSpec.mxfp4()
    gscale = None
    if spec.has_global:
        gscale = ct_utils.generate_gparam(w.min(), w.max())
        assert torch.equal(floatq.global_scale(w), gscale)
    mn, mx = grouped_minmax(w, spec.group_size)
    scale, zp = ct_utils.calculate_qparams(mn, mx, args, global_scale=gscale)
    ours = floatq.quantize_float_rtn(w, spec)
    assert torch.equal(ours.scales, scale)
    if name == "MXFP4A16":
        assert torch.equal(floatq.e8m0_exponents(ours.scales).float() - 127, torch.log2(scale))
    lib_q = ct_forward.quantize(w, scale, zp, args, global_scale=gscale)
    assert torch.equal(ours.values.float(), lib_q)
    lib_dq = ct_forward.fake_quantize(w, scale, zp, args, global_scale=gscale)
    assert torch.equal(ours.dequantize(), lib_dq)
    assert torch.equal(ours.dequantize(), ct_forward.dequantize(lib_q, scale, zp, args, global_scale=gscale))
    if name == "MXFP4A16":  # the ties row rounds to even codes, as the library does
        assert ours.scales[5, 0] == 1 and ours.values[5, :8].float().tolist() == [6, 0, 1, 1, 2, 2, 4, 4]


@pytest.mark.parametrize("scale_dtype", [None, torch.bfloat16])
def test_fp8_channel_matches_library(scale_dtype):
    w = edge_weight()
    args = library_args("FP8_DYNAMIC")
    if scale_dtype is not None:
        args = args.model_copy(update={"scale_dtype": scale_dtype})
    scale, zp = ct_utils.calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ours = floatq.quantize_float_rtn(w, floatq.FloatSpec.fp8_channel(scale_dtype))
    assert torch.equal(ours.scales, scale)
    lib_q = ct_forward.quantize(w, scale, zp, args)
    assert torch.equal(ours.values.float(), lib_q)
    assert torch.equal(ours.dequantize(), ct_forward.fake_quantize(w, scale, zp, args))
    sub = ours.values[4, 1:].float().abs()
    assert ((sub > 0) & (sub < 2**-6)).sum() > 100  # the subnormal row was really exercised


def test_fp8_block_matches_library():
    w = edge_weight()  # 200 rows: a partial block of rows, padded as the library pads
    args = library_args("FP8_BLOCK")
    padded = torch.nn.functional.pad(w, (0, 0, 0, 56))
    blocks = padded.reshape(2, 128, 2, 128).transpose(1, 2)
    scale, zp = ct_utils.calculate_qparams(blocks.amin((-1, -2)), blocks.amax((-1, -2)), args)
    ours = floatq.quantize_float_rtn(w, floatq.FloatSpec.fp8_block())
    assert torch.equal(ours.block_scales(), scale)
    assert torch.equal(ours.values.float(), ct_forward.quantize(w, scale, zp, args))
    assert torch.equal(ours.dequantize(), ct_forward.fake_quantize(w, scale, zp, args))


def test_fp8_tensor_matches_library():
    """FP8 (static)'s per-tensor weight scale: one scale for the whole weight, the library's."""
    w = edge_weight()
    args = library_args("FP8")
    scale, zp = ct_utils.calculate_qparams(w.amin(), w.amax(), args)
    ours = floatq.quantize_float_rtn(w, floatq.FloatSpec.fp8_tensor())
    assert torch.equal(ours.scales, scale.expand(w.shape[0], 1))
    assert torch.equal(ours.values.float(), ct_forward.quantize(w, scale, zp, args))
    assert torch.equal(ours.dequantize(), ct_forward.fake_quantize(w, scale, zp, args))


def test_int8_channel_matches_library():
    """The integer path (W8A8's per-channel int8 weights): codes - 128 are the library's signed
    codes and the scales are equal, except for an all-zero row: ours has scale 1, the library's
    float32 eps (both store zero codes there and dequantize to zeros)."""
    w = edge_weight()
    args = library_args("W8A8")
    scale, zp = ct_utils.calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ours = quantize_rtn(w, QuantSpec(bits=8, group_size=-1, symmetric=True, scale_dtype=None))
    live = w.abs().amax(1) > 0
    assert torch.equal(ours.scales[live], scale[live])
    assert ours.scales[0].item() == 1 and scale[0].item() == torch.finfo(torch.float32).eps
    lib_q = ct_forward.quantize(w, scale, zp, args)
    assert torch.equal(ours.codes.float() - 128, lib_q)
    assert torch.equal(ours.dequantize(), ct_forward.fake_quantize(w, scale, zp, args))


@pytest.mark.parametrize("seed", range(3))
def test_round_e2m1_is_nearest_ties_to_even(seed):
    """Against the definition: the nearest grid value, a tie going to the even code."""
    x = (torch.rand(4096, generator=torch.Generator().manual_seed(seed)) - 0.5) * 16
    x[:16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -9])
    grid = torch.tensor(floatq.E2M1_VALUES)
    got = floatq.round_e2m1(x.clamp(-6, 6))
    d = (x.clamp(-6, 6).abs().unsqueeze(1) - grid).abs()
    best = d.min(1, keepdim=True).values
    cand = (d == best).float() * (1 + torch.arange(8) % 2 * -0.5)  # prefer even codes on a tie
    want = grid[cand.argmax(1)] * torch.sign(x)
    assert torch.equal(got, want)
    assert torch.equal(got, ct_utils.fp4_utils.cast_to_fp4(x.clamp(-6, 6)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_e2m1_is_the_librarys_cast_on_both_sides_of_every_midpoint(dtype):
    """Every multiple of 2**-10 up to 7 and its neighbours one ulp either way, both signs,
    infinities and NaN: the same values, signs of zero and dtype as compressed-tensors'
    `cast_to_fp4` after its clamp to [-6, 6]."""
    g = torch.arange(0, 7, 2**-10, dtype=dtype)
    up, down = torch.nextafter(g, torch.tensor(9.0, dtype=dtype)), torch.nextafter(g, torch.tensor(-9.0, dtype=dtype))
    x = torch.cat([g, up, down, -g, -up, torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0], dtype=dtype)])
    got = floatq.round_e2m1(x)
    ref = ct_utils.fp4_utils.cast_to_fp4(x.clamp(-6, 6))
    assert got.dtype == dtype
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got.isnan()[-2])
    ok = ~ref.isnan()
    assert torch.equal(got[ok], ref[ok]) and torch.equal(got[ok].signbit(), ref[ok].signbit())


def test_e4m3_to_float_is_torchs_cast_bit_for_bit():
    """Every one of the 256 codes (subnormals, both zeros, ±448, both NaNs), in a larger
    non-contiguous tensor too: the float32 bits of torch's own cast."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for v in (codes, codes[codes.view(torch.uint8) & 0x7F != 0x7F]):  # with and without the NaNs
        assert torch.equal(floatq.e4m3_to_float(v).view(torch.int32), v.float().view(torch.int32))
    w = (torch.randn(96, 80, generator=torch.Generator().manual_seed(0)) * 50).to(torch.float8_e4m3fn).t()
    got = floatq.e4m3_to_float(w)
    assert got.shape == w.shape and torch.equal(got.view(torch.int32), w.float().view(torch.int32))


# --- RTN and GPTQ through the float quantizers -----------------------------------------

from shardquant.algorithms.gptq import GPTQSolver  # noqa: E402

FLOAT_SPECS = {
    "nvfp4": floatq.FloatSpec.nvfp4(),
    "mxfp4": floatq.FloatSpec.mxfp4(),
    "fp8_channel": floatq.FloatSpec.fp8_channel(),
    "fp8_block": floatq.FloatSpec.fp8_block(),
    "fp8_tensor": floatq.FloatSpec.fp8_tensor(),
}


def correlated_problem(out_f: int = 160, in_f: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(4 * in_f, in_f, generator=g) @ mix * (1 + 3 * torch.rand(in_f, generator=g))
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x.T @ x


def layer_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


@pytest.mark.parametrize("name", list(FLOAT_SPECS))
@pytest.mark.parametrize("static", [True, False])
def test_gptq_with_diagonal_hessian_is_rtn(name, static):
    """With a diagonal H no error moves to other columns: GPTQ rounds every column exactly as
    RTN does (values, scales and the global scale)."""
    spec = FLOAT_SPECS[name]
    w = edge_weight()
    H = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    got = GPTQSolver(H, group_size=spec.group_size).quantize(w, spec, static_groups=static).weight
    ref = floatq.quantize_float_rtn(w, spec)
    assert torch.equal(got.values.float(), ref.values.float())
    assert torch.equal(got.scales, ref.scales)
    assert (got.global_scale is None) == (ref.global_scale is None)
    if ref.global_scale is not None:
        assert torch.equal(got.global_scale, ref.global_scale)
    assert torch.equal(got.dequantize(), ref.dequantize())


@pytest.mark.parametrize("name", list(FLOAT_SPECS))
@pytest.mark.parametrize("order", ["plain", "act_order"])
def test_gptq_beats_rtn_on_correlated_hessian(name, order):
    """GPTQ's layer error tr(dW H dW^T) is below RTN's for each float format (issue 19: NVFP4
    and MXFP4 at least)."""
    spec = FLOAT_SPECS[name]
    w, H = correlated_problem()
    solver = GPTQSolver(H, act_order=order == "act_order", group_size=spec.group_size)
    got = solver.quantize(w, spec, static_groups=order == "act_order").weight
    rtn = floatq.quantize_float_rtn(w, spec)
    e_gptq, e_rtn = layer_error(w, got.dequantize(), H), layer_error(w, rtn.dequantize(), H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # every value is on the format's grid and the weight dequantizes through the scales
    v = got.values.float()
    if spec.kind != "fp8":
        assert set(v.abs().unique().tolist()) <= set(floatq.E2M1_VALUES)
    assert torch.isfinite(got.dequantize()).all()


def test_gptq_many_equals_separate_with_own_global_scales():
    """Stacked linears (q/k/v sharing an input) each keep their own NVFP4 global scale; the
    stacked solve equals separate solves (here bit for bit)."""
    spec = floatq.FloatSpec.nvfp4()
    w, H = correlated_problem()
    parts = [w[:64], w[64:] * 4]
    solver = GPTQSolver(H, group_size=16)
    many = solver.quantize_many(parts, spec)
    for p, r in zip(parts, many, strict=True):
        one = solver.quantize(p, spec).weight
        assert torch.equal(r.weight.global_scale, floatq.global_scale(p).expand(p.shape[0]))
        assert torch.equal(r.weight.values.float(), one.values.float())
        assert torch.equal(r.weight.scales, one.scales)


def test_gptq_float_refuses_dynamic_act_order():
    spec = floatq.FloatSpec.mxfp4()
    w, H = correlated_problem()
    with pytest.raises(ValueError, match="act_order needs static_groups"):
        GPTQSolver(H, act_order=True).quantize(w, spec, static_groups=False)


def test_pack_e2m1_is_the_librarys_packing():
    """Every E2M1 value of both signs, in both nibbles: the bytes of compressed-tensors'
    `pack_fp4_to_uint8` (-0.0 as +0.0, which is what its compressor writes for a zero); a value
    off the grid or an odd width is refused."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    grid = torch.tensor(floatq.E2M1_VALUES)
    vals = torch.cat([grid, -grid])  # 16 values, -0.0 among them
    x = torch.cartesian_prod(vals, vals).reshape(16, 32)
    got = floatq.pack_e2m1(x.to(torch.float8_e4m3fn))
    assert got.dtype == torch.uint8 and got.shape == (16, 16)
    assert torch.equal(got, pack_fp4_to_uint8(x + 0.0))
    with pytest.raises(ValueError, match="not on the E2M1 grid"):
        floatq.pack_e2m1(torch.tensor([[0.5, 0.75]]).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="even number of columns"):
        floatq.pack_e2m1(torch.zeros(2, 3).to(torch.float8_e4m3fn))
