"""Dense weights from a packed checkpoint's tensors, one linear at a time.

`shardquant eval` (and any `ModelSource`) reads checkpoints that hold a quantized linear
`<name>` as packed tensors instead of a float `<name>.weight`: compressed-tensors (every format
its config groups may name: `model.packed_ct`), GPTQ v1 (and v2) and AWQ GEMM, whichever tool
wrote them. The integer layouts are the ones `export.formats` defines (`CompressedTensorsLayout`
pack-quantized, `GPTQLayout`, `AWQLayout`); each reader here undoes one, in float32:
`w[o, j] = scale[g, o] * (code[o, j] - zero[g, o])`, `g` the group of input column `j`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from shardquant.algorithms.pack import unpack, unpack_awq
from shardquant.errors import UserError
from shardquant.export.formats import PACKED, Layout
from shardquant.model.packed_ct import CTConfig

Tensors = dict[str, Tensor]  # a linear's tensors by suffix (weight_packed, scales, ...)


def _groups(in_f: int, n_groups: int, g_idx: Tensor | None) -> Tensor:
    """The group of each input column: g_idx when stored, else consecutive groups."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_f) // -(-in_f // n_groups)


def compressed_tensors(t: Tensors, qc: dict) -> Tensor:
    """pack-quantized: signed codes (+2**(bits-1) packed) along in, optional signed zero point
    packed along out, scale [out, groups]."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    out_f, in_f = (int(x) for x in t["weight_shape"])
    bits = _bits(qc, t["weight_packed"].shape[1], in_f)
    codes = unpack_from_int32(t["weight_packed"], bits, torch.Size((out_f, in_f))).float()
    scale = t["weight_scale"].float()
    zero = torch.zeros_like(scale)
    if "weight_zero_point" in t:
        zero = unpack_from_int32(t["weight_zero_point"], bits, torch.Size(scale.shape), packed_dim=0).float()
    g = _groups(in_f, scale.shape[1], t.get("weight_g_idx"))
    return (codes - zero[:, g]) * scale[:, g]


def _bits(qc: dict, words: int, in_f: int) -> int:
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("num_bits"):
            return int(w["num_bits"])
    return 32 * words // in_f


def gptq(t: Tensors, qc: dict) -> Tensor:
    """GPTQ v1: codes [in, out] packed along in, `zero - 1` [groups, out] packed along out
    (v2 stores the zero itself), scales [groups, out], g_idx [in]."""
    bits = int(qc.get("bits", 4))
    in_f = t["qweight"].shape[0] * 32 // bits
    out_f = t["qweight"].shape[1]
    codes = unpack(t["qweight"], bits, in_f, dim=0).float()
    zeros = unpack(t["qzeros"], bits, out_f, dim=1).float()
    if qc.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros = zeros + 1
    scales = t["scales"].float()
    g = _groups(in_f, scales.shape[0], t.get("g_idx"))
    return ((codes - zeros[g]) * scales[g]).t()


def awq(t: Tensors, qc: dict) -> Tensor:
    """AWQ GEMM: codes [in, out] and zeros [groups, out] in AWQ's interleaved 4-bit packing
    along out, scales [groups, out]."""
    codes = unpack_awq(t["qweight"], dim=1).float()
    zeros = unpack_awq(t["qzeros"], dim=1).float()
    scales = t["scales"].float()
    g = _groups(codes.shape[0], scales.shape[0], None)
    return ((codes - zeros[g]) * scales[g]).t()


READERS: dict[str, Callable[[Tensors, dict], Tensor]] = {
    "compressed-tensors": compressed_tensors, "gptq": gptq, "awq": awq,
}


class PackedReader:
    """The linears of one packed checkpoint: which names are packed and their dense weights."""

    def __init__(self, fmt: str, qc: dict, ct: CTConfig | None = None):
        """`ct`: a compressed-tensors checkpoint's config groups (which linears, which format)."""
        self.layout: type[Layout] = PACKED[fmt]
        self.qc = qc
        self.read = READERS[fmt]
        self.ct = ct

    def parts(self, linear: str, present: Callable[[str], bool], module: torch.nn.Module | None = None) -> list[str] | None:
        """The stored tensor names of `linear` (its prefix) when it is packed, else None
        (`module`: its skeleton module, which compressed-tensors' targets match)."""
        if self.ct is not None:
            return self.ct.parts(linear, present, module)
        if present(f"{linear}.weight") or not present(f"{linear}.{self.layout.marker}"):
            return None
        return [f"{linear}.{s}" for s in self.layout.siblings if present(f"{linear}.{s}")]

    def weight(self, linear: str, tensors: dict[str, Tensor]) -> Tensor:
        """The float32 [out, in] weight of `linear` from its stored tensors (full names)."""
        by_suffix = {n.removeprefix(f"{linear}."): t for n, t in tensors.items()}
        try:
            if self.ct is None:
                return self.read(by_suffix, self.qc)
            qc = self.ct.pack_config(linear)
            return self.ct.weight(linear, by_suffix) if qc is None else self.read(by_suffix, qc)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"model.path: cannot dequantize '{linear}' as {self.layout.name}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def kernel_linear(self, linear: str, tensors: dict[str, Tensor], device: torch.device) -> torch.nn.Module | None:
        """`linear` as a `kernels.w4a16.PackedLinear` on `device`, holding its stored tensors
        (full names) as they are, when the W4A16 kernel runs there (`kernels.select.chooses`)
        and covers it: compressed-tensors pack-quantized 4-bit. None: read it dense (`weight`)."""
        from shardquant.kernels import select

        by_suffix = {n.removeprefix(f"{linear}."): t for n, t in tensors.items()}
        qc = None if self.ct is None else self.ct.pack_config(linear)
        if qc is None or not select.chooses(device):
            return None
        try:
            out_f, in_f = (int(x) for x in by_suffix["weight_shape"])
            packed, scale = by_suffix["weight_packed"], by_suffix["weight_scale"]
        except (KeyError, ValueError):
            return None  # `weight` names what is wrong
        if _bits(qc, packed.shape[1], in_f) != 4 or scale.dim() != 2 or scale.shape[0] != out_f:
            return None
        from shardquant.kernels.w4a16 import PackedLinear

        zero, g_idx = by_suffix.get("weight_zero_point"), by_suffix.get("weight_g_idx")
        return PackedLinear(
            packed.to(device), scale.to(device), None if zero is None else zero.to(device), (out_f, in_f), bits=4,
            group_size=-(-in_f // scale.shape[1]), g_idx=None if g_idx is None else g_idx.to(device),
        )


    def inputs(self, linear: str, tensors: dict[str, Tensor]):
        """A packed `linear`'s input quantization, (the library's `QuantizationArgs`, its stored
        static parameters by suffix), from its stored tensors (full names); None: its inputs
        stay as they are."""
        if self.ct is None:
            return None
        return self.ct.inputs(linear, {n.removeprefix(f"{linear}."): t for n, t in tensors.items()})

    def described_inputs(self) -> str | None:
        """How the checkpoint quantizes inputs, in words; None when it does not."""
        return None if self.ct is None else self.ct.described_inputs()


def packed_reader(raw_config: dict, where: str = "config.json") -> PackedReader | None:
    """The reader of a config.json's `quantization_config` (None: dense weights; `where`: the
    file, named by errors)."""
    qc = raw_config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in READERS:
        raise UserError(f"model.path: quantization_config quant_method '{method}' is not read "
                        f"(readable: {', '.join(sorted(READERS))}, or dense weights)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise UserError(f"model.path: AWQ version '{qc.get('version')}' is not read (GEMM is)")
    ct = CTConfig({"format": "pack-quantized", **qc}, where) if method == "compressed-tensors" else None
    return PackedReader(method, qc, ct)
