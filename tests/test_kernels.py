"""The Triton kernels (kernels/) against their references, in triton's CPU interpreter.

TRITON_INTERPRET=1 is set before any kernel module is imported, so `triton.jit` hands back
interpreted kernels that run on CPU tensors; `kernels.mode: triton` (`select.using`) makes
the dispatch run them. Shapes are tiny: the interpreter costs per operation.

- GPTQ's block kernel: the same codes, scales and zeros as the torch solver (`_solve`).
- fake-quant: bit-equal to `awq.scaled_fake_quantize` / `fake_quantize_weight`'s torch path,
  and, for W8A8's dynamic per-token int8 inputs, to compressed-tensors' own fake_quantize.
- the pack-quantized matmul: equal to compressed-tensors' own unpacking, dequantized by hand.
- a run with `kernels.mode: triton` exports the same checkpoint as `torch`, and report.json
  says which ran.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit wraps any kernel of ours

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import read_checkpoint, run_config, save_tiny_model  # noqa: E402

from shardquant.algorithms import awq  # noqa: E402
from shardquant.algorithms.gptq import GPTQSolver  # noqa: E402
from shardquant.algorithms.quantizer import MSEGrid, QuantSpec  # noqa: E402
from shardquant.kernels import select  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run (install shardquant[triton])")


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """The kernels really are interpreted (else they would need a GPU to compile for)."""
    from triton.runtime.interpreter import InterpretedFunction

    from shardquant.kernels import fakequant, gptq, w4a16

    for k in (gptq._gptq_block_kernel, fakequant._fake_quant_kernel, w4a16._w4a16_kernel):
        assert isinstance(k, InterpretedFunction)
    select.take_ran()
    yield


def _hessian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) * (torch.rand(n, generator=g) + 0.2)
    h = x.T @ x
    h[3, :] = h[:, 3] = 0  # a dead column
    return h


# (rows, cols, group, symmetric, act_order, static_groups, group_range, block, dtype, mse)
GPTQ_CASES = {
    "groups-start-mid-block": (12, 44, 8, True, False, False, "current", 16, torch.float32, False),
    "asym-act-order-12-in-32": (12, 44, 12, False, True, False, "current", 32, torch.float32, False),
    "per-channel-act-order-fp16": (9, 40, -1, False, True, False, "current", 16, torch.float16, False),
    "static-groups-act-order": (12, 40, 8, True, True, True, "current", 16, torch.float32, False),
    "block-start-ranges-fp16": (12, 44, 12, False, False, False, "block_start", 16, torch.float16, False),
    "mse-asym": (10, 40, 8, False, False, False, "current", 32, torch.float32, True),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_block_kernel_gives_the_torch_solvers_codes(case):
    rows, cols, gs, sym, act, static, grange, block, dtype, mse = GPTQ_CASES[case]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    spec = QuantSpec(bits=4, group_size=gs, symmetric=sym)
    solver = GPTQSolver(_hessian(cols, 2), act_order=act)
    kw = dict(block_size=block, static_groups=static, group_range=grange, mse=MSEGrid(grid=10) if mse else None)
    with select.using("torch"):
        ref = solver.quantize(w, spec, **kw)
    assert select.take_ran() == {"gptq_block": "torch"}
    with select.using("triton"):
        out = solver.quantize(w, spec, **kw)
    assert select.take_ran() == {"gptq_block": "triton"}
    assert torch.equal(out.weight.codes, ref.weight.codes)
    assert torch.equal(out.weight.scales, ref.weight.scales)
    assert torch.equal(out.weight.zeros, ref.weight.zeros)
    assert torch.equal(out.weight.g_idx, ref.weight.g_idx)
    assert out.loss == pytest.approx(ref.loss, rel=1e-5)
    assert ref.weight.codes.float().std() > 1  # codes spread over the range: not a degenerate case


def test_gptq_dispatch_follows_the_mode():
    """auto on CPU tensors and every float64 solve take the torch path; `triton` without the
    interpreter or a GPU refuses to run."""
    w = torch.randn(4, 16)
    solver = GPTQSolver(_hessian(16, 3))
    spec = QuantSpec(bits=4, group_size=8)
    with select.using("auto"):
        solver.quantize(w, spec)
    assert select.take_ran() == {"gptq_block": "torch"}
    with select.using("triton"):
        GPTQSolver(_hessian(16, 3).double()).quantize(w.double(), spec)
    assert select.take_ran() == {"gptq_block": "torch"}
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with select.using("triton"), pytest.raises(RuntimeError, match="needs a CUDA device or TRITON_INTERPRET=1"):
            solver.quantize(w, spec)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        select.set_mode("cuda")


# (rows, cols, group, symmetric, pre-scale, dtype)
FAKE_CASES = {
    "sym-groups-scaled": (20, 72, 16, True, True, torch.float32),
    "asym-partial-group": (33, 50, 24, False, True, torch.float32),
    "per-channel-fp16-chunks": (9, 1100, -1, False, True, torch.float16),
    "asym-fp16-unscaled": (17, 64, 32, False, False, torch.float16),
}


@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_fake_quant_kernel_equals_the_torch_reference(case):
    rows, cols, gs, sym, scaled, dtype = FAKE_CASES[case]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    s = torch.rand(cols, generator=g) + 0.5
    spec = QuantSpec(bits=4, group_size=gs, symmetric=sym)

    def run():
        return awq.scaled_fake_quantize(w, s, spec) if scaled else awq.fake_quantize_weight(w, spec)

    with select.using("torch"):
        ref = run()
    with select.using("triton"):
        out = run()
    assert select.take_ran() == {"fake_quant": "torch+triton"}
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert not torch.equal(ref, w.float())  # quantization changed the weight


def _w8a8_inputs():
    from shardquant.calib.inputs import input_args
    from shardquant.config import QuantConfig

    return input_args(QuantConfig(scheme="W8A8", method="gptq"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so -0.0 and 0.0 differ)."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_fake_quant_kernel_is_the_librarys_int8_per_token_rounding(dtype):
    """W8A8's dynamic symmetric per-token int8 input through the kernel: bit for bit what
    compressed-tensors' own `compute_dynamic_scales_and_zp` + `fake_quantize` give, with a
    zero row, an outlier, a row of tiny values, ties and negative values rounding to -0."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from shardquant.calib.inputs import fake_quantize_input

    args = _w8a8_inputs()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 37, 300, generator=g) * (torch.rand(3, 37, 1, generator=g) * 4)  # 300 > one chunk
    x[0, 1] = 0.0  # a zero row: the library's eps scale
    x[1, 2, 5] = 3e3  # an outlier crushes its row to a few codes
    x[2, 3] *= 1e-3
    ties = torch.tensor([127.5, 0.5, 1.5, 2.5, -0.5, -2.5, -0.3, -127.5])  # absmax 127.5: scale 1
    x[0, 4, :8], x[0, 4, 8:] = ties, 0.1
    x = x.to(dtype)
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    ref = fake_quantize(x=x, scale=scale, zero_point=zero, args=args)
    with select.using("triton"):
        out = fake_quantize_input(x, args, {})
    assert select.take_ran() == {"fake_quant_input": "triton"}
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(_bits(out), _bits(ref))
    # hand arithmetic: scale = absmax / 127.5 (the library's (127 - -128) / 2), round half to
    # even, clamp to [-128, 127]; torch.round keeps the sign of -0.3 -> -0.0
    hand = torch.tensor([127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -0.0, -128.0], dtype=dtype)
    assert torch.equal(_bits(out[0, 4, :8]), _bits(hand))
    assert torch.equal(scale[1, 7], (x[1, 7].abs().amax() / 127.5).reshape(1))
    assert torch.equal(out[0, 1], torch.zeros(300, dtype=dtype))
    assert out[1, 2].unique().numel() < 10  # the outlier's row: few codes
    assert (out != x).float().mean() > 0.5  # quantization changed the activations (bf16 is near int8)


@pytest.mark.parametrize("chunk", [None, 96 * 4])
@pytest.mark.parametrize("scheme", ["NVFP4", "MXFP4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp4_inputs_on_cpu_are_the_librarys_rounding(scheme, dtype, chunk, monkeypatch):
    """A 4-bit float input on CPU (rounded by `floatq.round_e2m1`, not the library's CPU cast)
    is bit for bit compressed-tensors' `compute_dynamic_scales_and_zp` + `fake_quantize`: a
    zero group, an all-equal group, an outlier, tiny values, values that land on the E2M1
    midpoints, with and without NVFP4's static global scale; in one piece, and taken four rows
    at a time (27 rows: the last chunk short)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from shardquant.calib import inputs
    from shardquant.calib.inputs import (
        _fp4_path_covers,
        fake_quantize_input,
        input_args,
        static_params,
    )
    from shardquant.config import QuantConfig

    if chunk is not None:
        monkeypatch.setattr(inputs, "_FP4_CHUNK", chunk)

    args = input_args(QuantConfig(scheme=scheme, method="rtn"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 9, 96, generator=g) * torch.logspace(-2, 1, 96)
    x[0, 0, :32] = 0.0
    x[0, 1, :32] = -1.5
    x[1, 2, 3] = 4e3
    x[2, 3] *= 1e-4
    x[2, 4, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    x = x.to(dtype)
    assert _fp4_path_covers(x, args)
    params = static_params(args, x.abs().amax(), dtype)
    gscale = params.get("input_global_scale")
    assert (gscale is not None) == (scheme == "NVFP4")
    scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gscale)
    ref = fake_quantize(x=x, scale=scale, zero_point=zero, args=args, global_scale=gscale)
    out = fake_quantize_input(x, args, params)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(_bits(out), _bits(ref))
    assert (out != x).float().mean() > 0.5


@pytest.mark.parametrize("size", [16, 32, 24, 7, 1])
def test_group_extremes_are_amin_and_amax(size):
    """The halving reduction behind the fp4 input scales gives torch's amin/amax over the last
    dimension: even, odd and mixed sizes, zeros of both signs, infinities and a NaN. (Which
    zero comes out may differ, as between torch's own reduction orders: the scales take
    absolute values.)"""
    from shardquant.calib.inputs import _group_extremes

    g = torch.Generator().manual_seed(size)
    x = torch.randn(5, 6, size, generator=g) * 10
    x[0, 0] = torch.where(torch.rand(size, generator=g) < 0.5, -0.0, 0.0)
    x[0, 1, -1] = float("inf")
    x[1, 2, 0] = float("-inf")
    x[2, 3, size // 2] = float("nan")
    lo, hi = _group_extremes(x)
    torch.testing.assert_close(lo, x.amin(-1), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(hi, x.amax(-1), rtol=0, atol=0, equal_nan=True)
    assert lo[2, 3].isnan() and hi[2, 3].isnan() and hi[0, 1] == float("inf") and lo[0, 0] == 0


def test_linears_fed_one_tensor_share_its_quantized_copy():
    """q/k/v (and gate/up) read the same tensor: the second and third hook get the first's
    copy, equal to quantizing alone; a changed tensor, other parameters or another tensor get
    their own."""
    from shardquant.calib.inputs import (
        InputQuantizers,
        fake_quantize_input,
        input_args,
        static_params,
    )
    from shardquant.config import QuantConfig

    args = input_args(QuantConfig(scheme="NVFP4", method="rtn"))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    iq = InputQuantizers(args)
    p1, p2 = static_params(args, x.abs().amax(), x.dtype), static_params(args, 2 * x.abs().amax(), x.dtype)
    first = iq.quantize(x, p1)
    assert torch.equal(first, fake_quantize_input(x, args, p1))
    assert iq.quantize(x, {k: v.clone() for k, v in p1.items()}) is first  # equal parameters
    other = iq.quantize(x, p2)
    assert other is not first and torch.equal(other, fake_quantize_input(x, args, p2))
    again = iq.quantize(x, p1)
    assert again is not first and torch.equal(again, first)
    x.mul_(3)
    assert torch.equal(iq.quantize(x, p1), fake_quantize_input(x, args, p1))
    y = x.clone()
    assert iq.quantize(y, p1) is not iq.quantize(x, p1)


def test_other_inputs_keep_the_librarys_path_in_every_mode():
    """FP8 rounding, and a 2-D input (the library's `token` strategy then takes one scale for
    the whole tensor), run compressed-tensors' functions even in mode `triton`."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from shardquant.calib.inputs import fake_quantize_input, input_args
    from shardquant.config import QuantConfig

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    fp8 = input_args(QuantConfig(scheme="FP8_DYNAMIC", method="rtn"))
    w8a8 = _w8a8_inputs()
    flat = x.reshape(10, 32)
    with select.using("triton"):
        y8 = fake_quantize_input(x, fp8, {})
        y2 = fake_quantize_input(flat, w8a8, {})
    assert select.take_ran() == {"fake_quant_input": "torch"}
    s, z = compute_dynamic_scales_and_zp(value=x, args=fp8, module=None)
    assert torch.equal(y8, fake_quantize(x=x, scale=s, zero_point=z, args=fp8))
    s, z = compute_dynamic_scales_and_zp(value=flat, args=w8a8, module=None)
    assert s.numel() == 1
    assert torch.equal(y2, fake_quantize(x=flat, scale=s, zero_point=z, args=w8a8))


# (M, N, K, group, symmetric, g_idx, dtype)
W4A16_CASES = {
    "decode-sym-fp16": (1, 24, 40, 8, True, False, torch.float16),
    "asym-g_idx-fp32-ragged-K": (3, 40, 44, 4, False, True, torch.float32),
    "per-channel-asym-fp16": (5, 17, 64, -1, False, False, torch.float16),
    "batch-16-asym-fp16-g_idx": (16, 33, 48, 16, False, True, torch.float16),
}


@pytest.mark.parametrize("case", list(W4A16_CASES))
def test_packed_matmul_equals_the_librarys_unpacked_weight(case):
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32

    from shardquant.kernels.w4a16 import packed_linear

    m, n, k, gs, sym, has_g, dtype = W4A16_CASES[case]
    groups = 1 if gs == -1 else -(-k // gs)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(dtype)
    packed = pack_to_int32((codes - 8).to(torch.int8), 4)
    zp = None if sym else pack_to_int32((torch.randint(0, 16, (n, groups), generator=g) - 8).to(torch.int8), 4, 0)
    g_idx = torch.randint(0, groups, (k,), generator=g).to(torch.int32) if has_g else None
    cols = g_idx.long() if has_g else torch.arange(k) // (k if gs == -1 else gs)
    # the reference: the library's own unpacking, dequantized by hand, in the activations' dtype
    c = unpack_from_int32(packed, 4, torch.Size((n, k))).long() + 8
    z = 8 if sym else (unpack_from_int32(zp, 4, torch.Size((n, groups)), packed_dim=0).long() + 8)[:, cols]
    w = ((c - z).float() * scale.float()[:, cols]).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = x.float() @ w.float().T + bias.float()
    with select.using("triton"):
        y = packed_linear(x, packed, scale, zp, (n, k), bits=4, group_size=gs, g_idx=g_idx, bias=bias)
    assert select.take_ran() == {"w4a16_matmul": "triton"}
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the output's own rounding
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.fixture(scope="module")
def one_block_model(tmp_path_factory):
    """A one-block llama small enough for the interpreter (hidden 16, intermediate 32)."""
    return save_tiny_model(tmp_path_factory.mktemp("kernels") / "model", "llama", layers=1, hidden=16, inter=32)


def test_a_run_with_triton_kernels_exports_the_torch_runs_checkpoint(one_block_model, tmp_path, texts, one_thread):
    """AWQ's search (fake-quant) and GPTQ's solve through the kernels, end to end, on a
    one-block model: the same checkpoint as the torch references', and report.json says
    which ran."""
    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    root, model = tmp_path, one_block_model
    reports = {}
    for mode in ("torch", "triton"):
        cfg = run_config(model, texts, root / mode, kernels={"mode": mode},
                         quant={"method": "awq+gptq", "group_size": 8, "symmetric": False, "awq_grid": 4},
                         calib={"n_samples": 4, "seq_len": 32, "batch_size": 4}, eval={"enabled": False})
        reports[mode] = quantize(build_config(cfg), show_progress=False)
    for mode, r in reports.items():
        assert r["kernels"] == {"mode": mode, "ran": {"fake_quant": mode, "gptq_block": mode}}
        assert r["blocks"][0]["kernels"] == {"fake_quant": mode, "gptq_block": mode}
    ours, theirs = read_checkpoint(root / "triton" / "model"), read_checkpoint(root / "torch" / "model")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not ours[k].equal(theirs[k])] == []
    _packed_linear_reads_the_export(ours, "model.layers.0.mlp.down_proj", group_size=8)


def test_a_w8a8_run_with_the_input_kernel_gives_the_torch_runs_ppl_and_checkpoint(
    one_block_model, tmp_path, texts, one_thread
):
    """W8A8 (GPTQ): every quantized linear's int8 input simulated by the kernel in mode
    `triton`, through calibration and the quantized evaluation: the same perplexity and the
    same exported bytes as mode `torch` (the library's functions), and report.json says so."""
    from shardquant.config import build_config
    from shardquant.pipeline import quantize

    reports = {}
    for mode in ("torch", "triton"):
        cfg = run_config(one_block_model, texts, tmp_path / mode, kernels={"mode": mode},
                         calib={"n_samples": 4, "seq_len": 32, "batch_size": 4},
                         eval={"n_samples": 4, "seq_len": 32, "batch_size": 4})
        cfg["quant"] = {"method": "gptq", "scheme": "W8A8"}
        reports[mode] = quantize(build_config(cfg), show_progress=False)
    for mode, r in reports.items():
        assert r["kernels"]["mode"] == mode
        assert r["kernels"]["ran"]["fake_quant_input"] == mode
    q = reports["torch"]["ppl"]["quantized"]
    assert q is not None and q != reports["torch"]["ppl"]["fp"]
    assert reports["triton"]["ppl"]["quantized"] == q
    files = sorted(p.name for p in (tmp_path / "torch" / "model").glob("*.safetensors"))
    assert files
    for name in files:
        ours, theirs = (tmp_path / m / "model" / name for m in ("triton", "torch"))
        assert ours.read_bytes() == theirs.read_bytes(), name


def _packed_linear_reads_the_export(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> None:
    """`PackedLinear` on an exported (asymmetric, compressed-tensors) linear multiplies by the
    weight the library's own unpacking gives."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    from shardquant.kernels.w4a16 import PackedLinear

    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    scale = tensors[f"{name}.weight_scale"].float()
    codes = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, shape).float()
    zero = unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4, torch.Size(scale.shape), packed_dim=0).float()
    cols = torch.arange(shape[1]) // group_size
    w = (codes - zero[:, cols]) * scale[:, cols]
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(6))
    with select.using("triton"):
        y = PackedLinear.from_tensors(tensors, name, bits=4, group_size=group_size)(x)
    assert select.take_ran() == {"w4a16_matmul": "triton"}
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_kernels_mode_is_checked_before_any_weight_is_read(one_block_model, tmp_path, texts, monkeypatch):
    from shardquant.config import build_config
    from shardquant.errors import UserError
    from shardquant.prepare import prepare

    with pytest.raises(UserError, match=r"kernels\.mode"):
        build_config(run_config(one_block_model, texts, tmp_path / "bad", kernels={"mode": "cuda"}))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = build_config(run_config(one_block_model, texts, tmp_path / "out", kernels={"mode": "triton"},
                                  quant={"group_size": 8}))
    with pytest.raises(UserError, match=r"^kernels\.mode: triton needs a CUDA device \(model\.device is the CPU\)"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


COMPILE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shardquant.kernels import fakequant, gptq, w4a16

def compile_(fn, sig, const):
    src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(const, "constexpr")}, constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert "cubin" in k.asm, k.asm.keys()

P = "*fp32"
G = dict(W=P, U=P, Q=P, E=P, S=P, Z=P, G="*i32", QEND="*i32", rows="i32", n="i32", i1="i32", nb="i32",
         tiny="fp32", smax="fp32")
compile_(gptq._gptq_block_kernel, G, dict(maxq=15, SYM=False, SCALE_KIND=2, BS=128, BR=16))
F = dict(W="*fp16", S=P, Out=P, rows="i32", cols="i32", glen="i32", tiny="fp32", smax="fp32", eps="fp32")
compile_(fakequant._fake_quant_kernel, F, dict(maxq=15, SYM=False, SCALE_KIND=1, HAS_S=True, BR=16, BC=128, CT=False, XK=0))
T = dict(F, W="*bf16", S="*bf16", Out="*bf16")
compile_(fakequant._fake_quant_kernel, T, dict(maxq=255, SYM=True, SCALE_KIND=0, HAS_S=False, BR=16, BC=128,
                                               CT=True, XK=2))
M = dict(X="*fp16", Wp="*i32", S="*fp16", Z="*i32", GI="*i32", B="*fp16", Y="*fp16", M="i32", N="i32",
         K="i32", KW="i32", G="i32", glen="i32")
compile_(w4a16._w4a16_kernel, M, dict(BITS=4, HAS_Z=True, HAS_G=True, HAS_B=True, IEEE=False, TM=16, TN=64, TK=64))
print("compiled")
'''


def test_the_kernels_compile_for_a_gpu(tmp_path):
    """Triton's compiler (no GPU needed) turns each kernel, in the variant with the most
    branches taken, into a cubin for sm_90: what the
    interpreter cannot check (globals must be constexpr, the frontend's typing of branches
    and loop-carried values, the backend's lowering)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled afresh, nothing written to ~
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled"


def test_float_gptq_schemes_run_the_reference_in_every_mode():
    from shardquant.algorithms.floatq import FloatSpec

    with select.using("triton"):
        GPTQSolver(_hessian(32, 7)).quantize(torch.randn(4, 32), FloatSpec.mxfp4())
    assert select.take_ran() == {"gptq_block": "torch"}
