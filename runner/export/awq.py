"""`export.format: awq`: the AWQ GEMM checkpoint layout (AutoAWQ `version: gemm`), which vLLM
(`quantization: awq` / `awq_marlin`) and transformers (through GPTQModel's AWQ kernels) load.

Per quantized linear `<name>`, with `pack_awq` (see `algorithms/pack.py`: 8 codes per int32
word along the output dim, nibble i holding element (0, 2, 4, 6, 1, 3, 5, 7)[i]):

- `<name>.qweight`: int32 [in, out / 8], the unsigned 4-bit codes, transposed ([in, out]).
- `<name>.qzeros`: int32 [in / group, out / 8], the unsigned zero points, packed the same way
  (no `- 1` offset, unlike GPTQ v1).
- `<name>.scales`: float16 [in / group, out].

Weight `w[o, j] = scales[j // group, o] * (code[o, j] - zero[j // group, o])`, which is what
AutoAWQ's `dequantize_gemm` computes.

What the format holds: 4 bits only (AutoAWQ's GEMM module and vLLM's `awq` method refuse
anything else); contiguous groups of a positive size dividing every quantized linear's input
size (vLLM allocates `in / group_size` scale rows, so per-channel `-1` cannot be served); an
output size that is a multiple of 8. It has no g_idx, so GPTQ act-order needs
`quant.static_groups`. The format always stores zero points (`zero_point: true`): a symmetric
scheme is written as the asymmetric one it equals, every zero being 8 (2**(bits-1)), and
dequantizes to the same weights. Linears left in full precision (`quant.ignore`, lm_head) are
listed by full name in `modules_to_not_convert`, which readers match as substrings.

The tensors' names, dtypes and shapes and these limits are defined once, in
`formats.AWQLayout`; this module writes them.
"""

from __future__ import annotations

import torch

from shardquant.algorithms.pack import pack_awq
from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.export.base import PackedExporter, check_scheme, float16_scales, trivial_g_idx
from shardquant.export.formats import AWQLayout


class AWQExporter(PackedExporter):
    """`awq`: AWQ GEMM tensors (qweight, qzeros, scales) and an `awq` quantization_config."""

    layout_class = AWQLayout

    def config_json(self) -> dict:
        """The source config with `quantization_config` as AutoAWQ writes it
        (`AwqConfig.to_transformers_dict`)."""
        q = self.quant
        raw = super().config_json()
        raw["quantization_config"] = {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": q.group_size,
            "bits": q.bits,
            "version": "gemm",
            "modules_to_not_convert": self.unquantized_linears(),
        }
        return raw

    def linear_tensors(self, name: str, weight: QuantizedWeight, inputs=None) -> dict[str, torch.Tensor]:
        check_scheme(name, weight, self.quant)
        if not trivial_g_idx(weight):
            raise ValueError(f"{name}: act-order groups (non-trivial g_idx) cannot be stored in AWQ")
        scales = float16_scales(name, weight.scales).t()
        return {
            f"{name}.qweight": pack_awq(weight.codes.t(), dim=1),
            f"{name}.qzeros": pack_awq(weight.zeros.t(), dim=1),
            f"{name}.scales": scales.contiguous(),
        }
