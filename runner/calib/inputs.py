"""Input activation quantization of the quantized linears, as compressed-tensors serves it.

A scheme with `input_activations` (W8A8, FP8_DYNAMIC, NVFP4, ...; not with `quant.weights_only`)
quantizes every quantized linear's input. The arithmetic is the library's own: dynamic scales
through `compute_dynamic_scales_and_zp`, the rounding through `fake_quantize`, exactly what its
quantized forward does on a reloaded checkpoint. Static parameters (FP8's per-tensor
`input_scale`, NVFP4's `input_global_scale`) come from the input's absolute maximum, observed on
the calibration set (`algorithms.smoothquant.ChannelMax`, reduced by max over workers: exact),
through the library's `calculate_qparams` / `generate_gparam`.

`InputQuantizers` puts a forward pre-hook on a linear once it holds its quantized weight, so
every later pass (the later groups' observations, propagation, the quantized evaluation) sees
what the served model computes. Linears fed the same tensor with equal parameters (q/k/v,
gate/up) share one quantized copy of it, held while that tensor lives.

A dynamic symmetric per-token integer input (W8A8's) of a [batch, seq, ...] activation runs the
fused fake-quant kernel (`kernels.fakequant.fake_quant_tokens`, tallied as `fake_quant_input`)
where `kernels.select` says it runs: bit-equal to the library's arithmetic. Every other input
(FP8/FP4 rounding, static or group scales, a 2-D input, which the library's `token` strategy
quantizes per tensor) keeps the library's own functions, except the E2M1 rounding of a 4-bit
float input on CPU: the library's CPU fallback makes eight masked passes over the tensor (about
three quarters of NVFP4's input simulation there), so `_fake_quantize_fp4` runs the library's
`calculate_qparams` on each group's extremes and its fused quantize-dequantize with
`algorithms.floatq.round_e2m1`, a cache-sized chunk of rows at a time, bit-equal.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from shardquant.config import QuantConfig
from shardquant.kernels import select

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs


def input_args(q: QuantConfig) -> QuantizationArgs | None:
    """The library's `QuantizationArgs` of the linears' inputs, or None (not quantized)."""
    if not q.activations:
        return None
    return _input_args(q.model_dump_json())


@functools.cache
def _input_args(raw: str) -> QuantizationArgs:
    from shardquant.schemes import quantization_scheme

    return quantization_scheme(QuantConfig.model_validate_json(raw)).input_activations


def is_static(args: QuantizationArgs | None) -> bool:
    """Whether the inputs need calibrated parameters: a static scale, or NVFP4's global scale
    (`dynamic: local`: group scales per token, over a calibrated per-tensor global scale)."""
    return args is not None and args.dynamic is not True


def static_params(args: QuantizationArgs, absmax: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The stored input parameters from the input's absmax (a scalar or per channel): FP8
    static's `input_scale` (in the compute ``dtype``, as the library stores it) or NVFP4's
    float32 `input_global_scale`; {} for dynamic inputs."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    if not is_static(args):
        return {}
    amax = absmax.detach().float().abs().amax().reshape(1).cpu()
    if args.dynamic == "local":
        return {"input_global_scale": generate_gparam(-amax, amax)}
    scale, _zero = calculate_qparams(-amax, amax, args)  # symmetric presets: no zero point is stored
    return {"input_scale": scale.to(dtype)}


def fake_quantize_input(x: Tensor, args: QuantizationArgs, params: dict[str, Tensor]) -> Tensor:
    """``x`` quantized and dequantized as compressed-tensors' `forward_quantize` does for an
    input (`params`: the static tensors of `static_params`)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    if x.numel() == 0:
        return x
    if select.use_triton("fake_quant_input", x, supported=_token_kernel_covers(x, args)):
        from shardquant.kernels.fakequant import fake_quant_tokens

        return fake_quant_tokens(x.reshape(x.shape[0] * x.shape[1], -1), bits=args.num_bits).reshape(x.shape)
    gscale = params.get("input_global_scale")
    if gscale is not None:
        gscale = gscale.to(x.device)
    if _fp4_path_covers(x, args):
        return _fake_quantize_fp4(x, args, gscale)
    if args.dynamic in (True, "local"):
        scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None, global_scale=gscale)
    else:
        scale, zero = params["input_scale"].to(x.device), None
    return fake_quantize(x=x, scale=scale, zero_point=zero, args=args, global_scale=gscale)


def _token_kernel_covers(x: Tensor, args: QuantizationArgs) -> bool:
    """Whether the fake-quant kernel computes what the library does for ``x``: a dynamic
    symmetric integer input with one scale per token (dims 0 and 1: the library reduces the
    rest), in a float dtype the kernel reads."""
    return (
        args.type == "int" and args.symmetric and args.strategy == "token" and args.dynamic is True
        and args.scale_dtype is None and 2 <= args.num_bits <= 8 and x.dim() >= 3
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def _fp4_path_covers(x: Tensor, args: QuantizationArgs) -> bool:
    """Whether `_fake_quantize_fp4` computes what the library does for ``x``: a dynamic (or
    `local`) group-wise 4-bit float input on CPU whose columns split into whole groups."""
    return (
        x.device.type == "cpu" and args.type == "float" and args.num_bits == 4 and args.symmetric
        and args.strategy in ("group", "tensor_group") and args.dynamic in (True, "local")
        and x.dim() >= 2 and x.shape[-1] % args.group_size == 0
    )


_FP4_CHUNK = 1 << 19  # elements of one row chunk: 2 MiB in float32, so each pass stays in cache


def _fake_quantize_fp4(x: Tensor, args: QuantizationArgs, gscale: Tensor | None) -> Tensor:
    """The library's `fake_quantize` of a group-wise 4-bit float input, step for step (its
    dynamic scales, the divisor ``scale / global_scale``, the clamp to the element range, the
    dequantization in the scale's dtype), with the E2M1 rounding by `floatq.round_e2m1`.

    Groups lie within rows, so the rows are taken a cache-sized chunk at a time: each of the
    dozen elementwise passes then reads cache, not memory, and the result is the same."""
    from shardquant.algorithms.awq import row_chunks

    rows = x.reshape(-1, x.shape[-1])
    chunks = row_chunks(*rows.shape, _FP4_CHUNK)
    if len(chunks) == 1:
        return _fake_quantize_fp4_rows(rows, args, gscale).view(x.shape)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    for r in chunks:
        out[r] = _fake_quantize_fp4_rows(rows[r], args, gscale)
    return out.view(x.shape)


def _fake_quantize_fp4_rows(x: Tensor, args: QuantizationArgs, gscale: Tensor | None) -> Tensor:
    """`_fake_quantize_fp4` of a 2-D ``x``, in one piece. The scales are the library's
    `compute_dynamic_scales_and_zp`: its `calculate_qparams` of each group's minimum and
    maximum, which `_group_extremes` finds (torch's amin/amax over a last dimension of 16
    take 2-3x as long)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    from shardquant.algorithms.floatq import round_e2m1

    groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
    scale, _zero = calculate_qparams(*_group_extremes(groups), args, global_scale=gscale)
    if gscale is not None:
        scale = scale / gscale
    scale = scale.unsqueeze(-1)
    scaled = groups / scale
    rounded = round_e2m1(scaled)  # saturates at ±6: the library's clamp to [q_min, q_max] is in it
    return (rounded.to(scale.dtype) * scale).flatten(start_dim=-2).to(x.dtype)


def _group_extremes(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum and maximum over the last dimension, as `amin`/`amax` give them (NaN included;
    of +0.0 and -0.0 either may come out, which the symmetric scales' absolute value erases):
    by halving it while it is even, then torch's reductions over what is left."""
    lo = hi = groups
    while hi.shape[-1] % 2 == 0:
        half = hi.shape[-1] // 2
        lo = torch.minimum(lo[..., :half], lo[..., half:])
        hi = torch.maximum(hi[..., :half], hi[..., half:])
    if hi.shape[-1] == 1:  # torch's reductions over a trailing dimension of 1 are no cheap copy
        return lo.squeeze(-1), hi.squeeze(-1)
    return lo.amin(-1), hi.amax(-1)


class InputQuantizers:
    """The input quantization pre-hooks of one block's quantized linears."""

    def __init__(self, args: QuantizationArgs | None):
        self.args = args
        self.params: dict[str, dict[str, Tensor]] = {}  # static parameters by linear
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._last: tuple[weakref.ref, int, dict[str, Tensor], Tensor] | None = None

    def quantize(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """`fake_quantize_input` of ``x``, or the copy the previous linear got when it was fed
        this very tensor (unchanged since) with equal parameters."""
        if x.is_inference():  # no version counter to tell an in-place change by
            return fake_quantize_input(x, self.args, params)
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and _same_params(last[2], params):
            return last[3]
        out = fake_quantize_input(x, self.args, params)
        self._last = (weakref.ref(x, self._forget), x._version, params, out)
        return out

    def _forget(self, _ref: weakref.ref) -> None:
        if self._last is not None and self._last[0] is _ref:
            self._last = None

    def attach(self, name: str, linear: nn.Module) -> None:
        """Quantize `linear`'s input from now on (once; with its static `params` if any)."""
        if self.args is None or name in self._handles:
            return
        if is_static(self.args) and name not in self.params:
            raise ValueError(f"{name}: its static input parameters were not calibrated before it was quantized")
        params = self.params.get(name, {})

        def hook(_mod, inputs):
            return (self.quantize(inputs[0], params), *inputs[1:])

        self._handles[name] = linear.register_forward_pre_hook(hook)

    def clear(self) -> None:
        """Remove every hook (the block is done)."""
        for h in self._handles.values():
            h.remove()
        self._handles, self.params, self._last = {}, {}, None


def _same_params(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
