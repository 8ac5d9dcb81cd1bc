"""`export.format: gptq`: the GPTQ v1 checkpoint layout (AutoGPTQ / GPTQModel
`checkpoint_format: gptq`).

Per quantized linear `<name>`, with `pack` little end first (see `algorithms/pack.py`):

- `<name>.qweight`: int32 [in * bits / 32, out], the unsigned codes packed along the input dim.
- `<name>.qzeros`: int32 [n_groups, out * bits / 32], `zero - 1` packed along the output dim
  (v1 convention: readers add the 1 back).
- `<name>.scales`: float16 [n_groups, out].
- `<name>.g_idx`: int32 [in], the group of each input column (act-order groups included).

Weight `w[o, j] = scales[g, o] * (code[o, j] - zero[g, o])` with `g = g_idx[j]`.

Only symmetric schemes: v1's `zero - 1` cannot store an asymmetric zero point of 0 (it reads
back as 2**bits), which a group of non-negative weights gets. Linears left in full precision
inside the blocks (`quant.ignore`) are refused too, since GPTQ readers quantize every linear
of a block unless told otherwise in reader-specific ways.
"""

from __future__ import annotations

import torch

from shardquant.algorithms.pack import PACK_BITS, pack
from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.errors import UserError
from shardquant.export.base import PackedExporter
from shardquant.export.shards import TensorSpec


class GPTQExporter(PackedExporter):
    """`gptq`: GPTQ v1 tensors (qweight, qzeros, scales, g_idx) and a `gptq` quantization_config."""

    format = "gptq"

    def check(self) -> None:
        super().check()
        q = self.quant
        if q.bits not in PACK_BITS:
            raise UserError(f"export.format: 'gptq' cannot hold quant.bits={q.bits} (2, 4 or 8)")
        if not q.symmetric:
            raise UserError(
                "export.format: 'gptq' cannot hold quant.symmetric=false (v1 stores zero - 1, so a "
                "zero point of 0 does not survive); use symmetric or export.format: compressed-tensors"
            )
        per = 32 // q.bits
        for name, (out_f, in_f) in self.source.linear_shapes().items():
            if in_f % per or out_f % per:
                raise UserError(
                    f"export.format: 'gptq' packs {per} codes per int32 word, but {name} is "
                    f"[{out_f}, {in_f}] (both sizes must be multiples of {per} at quant.bits={q.bits})"
                )
        ignored = [
            n for n in self.unquantized_linears() if n.startswith(f"{self.source.adapter.blocks}.")
        ]
        if ignored:
            raise UserError(
                f"export.format: 'gptq' cannot leave block linears in full precision "
                f"(quant.ignore matches {ignored[0]}); use export.format: compressed-tensors"
            )

    def config_json(self) -> dict:
        q = self.quant
        raw = super().config_json()
        raw["quantization_config"] = {
            "quant_method": "gptq",
            "bits": q.bits,
            "group_size": q.group_size,
            "desc_act": bool(q.act_order and q.method in ("gptq", "awq+gptq")),
            "sym": True,
            "static_groups": q.static_groups,
            "true_sequential": q.true_sequential,
            "damp_percent": q.damp,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
        return raw

    def linear_specs(self, name: str, out_features: int, in_features: int) -> list[TensorSpec]:
        q = self.quant
        groups = 1 if q.group_size == -1 else -(-in_features // q.group_size)
        return [
            TensorSpec(f"{name}.g_idx", torch.int32, (in_features,)),
            TensorSpec(f"{name}.qweight", torch.int32, (in_features * q.bits // 32, out_features)),
            TensorSpec(f"{name}.qzeros", torch.int32, (groups, out_features * q.bits // 32)),
            TensorSpec(f"{name}.scales", torch.float16, (groups, out_features)),
        ]

    def linear_tensors(self, name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        q, spec = self.quant, weight.spec
        if (spec.bits, spec.group_size, spec.symmetric) != (q.bits, q.group_size, q.symmetric):
            raise ValueError(f"{name}: quantized as {spec}, but the config says {q.bits} bits, "
                             f"group {q.group_size}, symmetric {q.symmetric}")
        scales = weight.scales.t().to(torch.float16)
        if not torch.equal(scales.float(), weight.scales.t().float()):
            raise ValueError(f"{name}: scales are not float16 values (QuantSpec.scale_dtype)")
        return {
            f"{name}.g_idx": weight.g_idx.to(torch.int32),
            f"{name}.qweight": pack(weight.codes, q.bits, dim=1).t().contiguous(),
            f"{name}.qzeros": pack(weight.zeros.t() - 1, q.bits, dim=1),
            f"{name}.scales": scales.contiguous(),
        }
