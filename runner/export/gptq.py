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

The tensors' names, dtypes and shapes and these limits are defined once, in
`formats.GPTQLayout`; this module writes them.
"""

from __future__ import annotations

import torch

from shardquant.algorithms.pack import pack
from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.config import GPTQ_METHODS
from shardquant.export.base import PackedExporter, check_scheme, float16_scales
from shardquant.export.formats import GPTQLayout


class GPTQExporter(PackedExporter):
    """`gptq`: GPTQ v1 tensors (qweight, qzeros, scales, g_idx) and a `gptq` quantization_config."""

    layout_class = GPTQLayout

    def config_json(self) -> dict:
        q = self.quant
        raw = super().config_json()
        raw["quantization_config"] = {
            "quant_method": "gptq",
            "bits": q.bits,
            "group_size": q.group_size,
            "desc_act": bool(q.act_order and q.method in GPTQ_METHODS),
            "sym": True,
            "static_groups": q.static_groups,
            "true_sequential": q.true_sequential,
            "damp_percent": q.damp,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
        return raw

    def linear_tensors(self, name: str, weight: QuantizedWeight, inputs=None) -> dict[str, torch.Tensor]:
        q = self.quant
        check_scheme(name, weight, q)
        scales = float16_scales(name, weight.scales).t()
        return {
            f"{name}.g_idx": weight.g_idx.to(torch.int32),
            f"{name}.qweight": pack(weight.codes, q.bits, dim=1).t().contiguous(),
            f"{name}.qzeros": pack(weight.zeros.t() - 1, q.bits, dim=1),
            f"{name}.scales": scales.contiguous(),
        }
