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
"""

from __future__ import annotations

import torch

from shardquant.algorithms.pack import AWQ_BITS, pack_awq
from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.errors import UserError
from shardquant.export.base import PackedExporter, trivial_g_idx
from shardquant.export.shards import TensorSpec

GPTQ_METHODS = ("gptq", "awq+gptq")


class AWQExporter(PackedExporter):
    """`awq`: AWQ GEMM tensors (qweight, qzeros, scales) and an `awq` quantization_config."""

    format = "awq"

    def check(self) -> None:
        super().check()
        q = self.quant
        if q.bits != AWQ_BITS:
            raise UserError(
                f"export.format: 'awq' cannot hold quant.bits={q.bits} (AWQ GEMM is 4-bit only); "
                "use export.format: compressed-tensors or gptq"
            )
        if q.group_size == -1:
            raise UserError(
                "export.format: 'awq' cannot hold quant.group_size=-1 (per channel: vLLM's AWQ needs "
                "a positive group size); use e.g. quant.group_size: 128 or export.format: compressed-tensors"
            )
        if q.method in GPTQ_METHODS and q.act_order and not q.static_groups:
            raise UserError(
                "export.format: 'awq' cannot hold quant.act_order groups (AWQ has no g_idx); set "
                "quant.static_groups: true, or use export.format: gptq"
            )
        quantized = set(self.quantized_linears(0))
        for name, (out_f, in_f) in self.source.linear_shapes().items():
            if name in quantized and (out_f % 8 or in_f % q.group_size):
                raise UserError(
                    f"export.format: 'awq' packs 8 codes per int32 word along the outputs, but {name} "
                    f"is [{out_f}, {in_f}] (out must be a multiple of 8, in of quant.group_size={q.group_size})"
                )

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

    def linear_specs(self, name: str, out_features: int, in_features: int) -> list[TensorSpec]:
        groups = in_features // self.quant.group_size
        return [
            TensorSpec(f"{name}.qweight", torch.int32, (in_features, out_features // 8)),
            TensorSpec(f"{name}.qzeros", torch.int32, (groups, out_features // 8)),
            TensorSpec(f"{name}.scales", torch.float16, (groups, out_features)),
        ]

    def linear_tensors(self, name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        q, spec = self.quant, weight.spec
        if (spec.bits, spec.group_size, spec.symmetric) != (q.bits, q.group_size, q.symmetric):
            raise ValueError(f"{name}: quantized as {spec}, but the config says {q.bits} bits, "
                             f"group {q.group_size}, symmetric {q.symmetric}")
        if not trivial_g_idx(weight):
            raise ValueError(f"{name}: act-order groups (non-trivial g_idx) cannot be stored in AWQ")
        scales = weight.scales.t().to(torch.float16)
        if not torch.equal(scales.float(), weight.scales.t().float()):
            raise ValueError(f"{name}: scales are not float16 values (QuantSpec.scale_dtype)")
        return {
            f"{name}.qweight": pack_awq(weight.codes.t(), dim=1),
            f"{name}.qzeros": pack_awq(weight.zeros.t(), dim=1),
            f"{name}.scales": scales.contiguous(),
        }
