"""`quant.scheme`: compressed-tensors' preset names and what their weights are, without torch.

The scheme objects a run uses are compressed-tensors' own (`shardquant.schemes` builds them
with `preset_name_to_scheme`); this table only lets the config validate a preset and the
explicit keys that refine it before torch is imported (`shardquant plan` never imports it).
tests/test_schemes.py checks every row against the installed library's `PRESET_SCHEMES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightType = Literal["int", "float"]
Strategy = Literal["group", "channel", "tensor", "tensor_group", "block"]


@dataclass(frozen=True)
class Preset:
    """The weight side of a compressed-tensors preset (and whether it quantizes inputs).

    ``group_size`` is the columns per scale (-1: per output channel, or the block's width for
    ``block``); ``block_rows`` the output rows that share a scale (1 except for ``block``).
    ``scale``: how scales are stored: ``float`` (the compute dtype), ``fp8`` (E4M3 with a
    per-tensor global scale, NVFP4) or ``e8m0`` (power-of-two exponents, MX formats)."""

    weight_type: WeightType
    bits: int
    strategy: Strategy
    group_size: int
    symmetric: bool = True
    block_rows: int = 1
    scale: Literal["float", "fp8", "e8m0"] = "float"
    activations: str | None = None  # how the preset quantizes input activations, None: not at all
    input_params: tuple[str, ...] = ()  # the calibrated input tensors a linear stores (static inputs)

    @property
    def kind(self) -> str:
        """The quantizer family: ``int``, ``fp8``, ``nvfp4`` or ``mxfp4``."""
        if self.weight_type == "int":
            return "int"
        if self.bits == 8:
            return "fp8"
        return "nvfp4" if self.scale == "fp8" else "mxfp4"


_INT_GROUP = dict(weight_type="int", strategy="group", group_size=128)
PRESETS: dict[str, Preset] = {
    "W4A16": Preset(bits=4, **_INT_GROUP),
    "W4A16_ASYM": Preset(bits=4, symmetric=False, **_INT_GROUP),
    "W8A16": Preset(bits=8, **_INT_GROUP),
    "W8A8": Preset("int", 8, "channel", -1, activations="int8 dynamic per token"),
    "W4AFP8": Preset(bits=4, activations="fp8 dynamic per token", **_INT_GROUP),
    "FP8": Preset("float", 8, "tensor", -1, activations="fp8 static per tensor", input_params=("input_scale",)),
    "FP8_DYNAMIC": Preset("float", 8, "channel", -1, activations="fp8 dynamic per token"),
    "FP8_BLOCK": Preset("float", 8, "block", 128, block_rows=128, activations="fp8 dynamic per group of 128"),
    "NVFP4A16": Preset("float", 4, "tensor_group", 16, scale="fp8"),
    "NVFP4": Preset("float", 4, "tensor_group", 16, scale="fp8", activations="nvfp4 dynamic per group of 16",
                    input_params=("input_global_scale",)),
    "MXFP4A16": Preset("float", 4, "group", 32, scale="e8m0"),
    "MXFP4": Preset("float", 4, "group", 32, scale="e8m0", activations="mxfp4 dynamic per group of 32"),
}
SUPPORTED_STRATEGIES: dict[str, tuple[str, ...]] = {  # weight strategies the quantizers implement
    "int": ("group", "channel"), "fp8": ("channel", "block", "tensor"), "nvfp4": ("tensor_group",), "mxfp4": ("group",),
}


def preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive, as compressed-tensors reads it); ValueError
    listing the known names otherwise."""
    p = PRESETS.get(name.upper())
    if p is None:
        raise ValueError(f"unknown preset '{name}'; known: {', '.join(PRESETS)}")
    return p
