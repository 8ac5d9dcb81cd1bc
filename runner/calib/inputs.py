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
what the served model computes.

A dynamic symmetric per-token integer input (W8A8's) of a [batch, seq, ...] activation runs the
fused fake-quant kernel (`kernels.fakequant.fake_quant_tokens`, tallied as `fake_quant_input`)
where `kernels.select` says it runs: bit-equal to the library's arithmetic. Every other input
(FP8/FP4 rounding, static or group scales, a 2-D input, which the library's `token` strategy
quantizes per tensor) keeps the library's own functions.
"""

from __future__ import annotations

import functools
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


class InputQuantizers:
    """The input quantization pre-hooks of one block's quantized linears."""

    def __init__(self, args: QuantizationArgs | None):
        self.args = args
        self.params: dict[str, dict[str, Tensor]] = {}  # static parameters by linear
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def attach(self, name: str, linear: nn.Module) -> None:
        """Quantize `linear`'s input from now on (once; with its static `params` if any)."""
        if self.args is None or name in self._handles:
            return
        if is_static(self.args) and name not in self.params:
            raise ValueError(f"{name}: its static input parameters were not calibrated before it was quantized")
        args, params = self.args, self.params.get(name, {})

        def hook(_mod, inputs):
            return (fake_quantize_input(inputs[0], args, params), *inputs[1:])

        self._handles[name] = linear.register_forward_pre_hook(hook)

    def clear(self) -> None:
        """Remove every hook (the block is done)."""
        for h in self._handles.values():
            h.remove()
        self._handles, self.params = {}, {}
