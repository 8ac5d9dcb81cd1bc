"""Round-to-nearest quantization: the baseline that needs no calibration data."""

from __future__ import annotations

import torch
from torch import Tensor

from .quantizer import MSEGrid, QuantizedWeight, QuantSpec, grouped, quantize_codes, search_qparams


def quantize_rtn(weight: Tensor, spec: QuantSpec, *, mse: MSEGrid | None = None) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to the nearest code of each group's min/max grid (or,
    with ``mse``, of the shrunk range that minimizes the group's error).

    Computed in float32 (float64 stays float64), all groups at once as
    [out, n_groups, group_len].
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight if weight.dtype == torch.float64 else weight.float()
    out_f, in_f = w.shape
    groups = grouped(w, spec)
    scale, zero = search_qparams(groups, spec, mse)
    codes = quantize_codes(groups, scale, zero, spec.maxq).reshape(out_f, -1)[:, :in_f]
    g_idx = torch.arange(in_f, device=w.device, dtype=torch.int32) // spec.group_len(in_f)
    return QuantizedWeight(
        codes=codes.contiguous(),
        scales=scale.squeeze(-1),
        zeros=zero.squeeze(-1).to(torch.int32),
        g_idx=g_idx,
        spec=spec,
    )
