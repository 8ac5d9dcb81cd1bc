"""A compressed-tensors checkpoint's config groups as `shardquant eval` reads them: which linears
each group quantizes, their dense float32 weights, and how their inputs are quantized.

Stored formats (the group's `format`, else the config's):

- `pack-quantized`: integer codes in int32 words (`model.packed.compressed_tensors`);
- `naive-quantized`, `float-quantized`, `int-quantized`: one FP8 or int8 `weight` per weight with
  its `weight_scale` (per tensor, channel, group or block): the library's compressor `decompress`
  (its `dequantize`), scales in float32;
- `nvfp4-pack-quantized`, `mxfp4-pack-quantized`: two E2M1 codes per uint8 of `weight_packed`,
  FP8 scales over a float32 `weight_global_scale` (NVFP4) or E8M0 scales (MXFP4): the library's
  `unpack_fp4_from_uint8`, `decompress_mx_scale` and `dequantize`, in float32 (its compressor
  unpacks into bfloat16, which would round NVFP4's products).

A group's `input_activations` are quantized as the served model does (`calib.inputs`, the
library's arithmetic), with the linear's stored `input_scale` (static) or `input_global_scale`
(NVFP4's `dynamic: local`). Anything else a config asks for (output activations, a KV-cache
scheme, sparsity, transforms, another format or strategy) is refused up front, naming config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from shardquant.errors import UserError
from shardquant.export.formats import describe_inputs

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

# format -> the tensor that marks a quantized linear
MARKERS = {
    "pack-quantized": "weight_packed", "naive-quantized": "weight", "float-quantized": "weight",
    "int-quantized": "weight", "nvfp4-pack-quantized": "weight_packed", "mxfp4-pack-quantized": "weight_packed",
}
SUFFIXES = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
            "weight_global_scale", "input_scale", "input_global_scale")
# format -> the weight strategies its reader dequantizes
WEIGHT_STRATEGIES = {
    "pack-quantized": ("channel", "group"), "naive-quantized": ("tensor", "channel", "group", "block"),
    "float-quantized": ("tensor", "channel", "group", "block"), "int-quantized": ("tensor", "channel", "group", "block"),
    "nvfp4-pack-quantized": ("group", "tensor_group"), "mxfp4-pack-quantized": ("group", "tensor_group"),
}
# input_activations.dynamic -> the strategies `calib.inputs.fake_quantize_input` computes
INPUT_STRATEGIES = {True: ("token", "tensor", "group", "tensor_group"), "local": ("tensor_group",),
                    False: ("tensor",)}
STATIC_PARAMS = {True: (), "local": ("input_global_scale",), False: ("input_scale",)}
FLOAT_FORMATS = ("float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized")
INT_FORMATS = ("pack-quantized", "int-quantized")


def _value(x: object) -> str:
    """An enum member's value (the library's models may hold either)."""
    return str(getattr(x, "value", x))


@dataclass(frozen=True)
class Group:
    """One config group: its name, the library's scheme and its stored format."""

    name: str
    scheme: QuantizationScheme
    format: str

    @property
    def marker(self) -> str:
        return MARKERS[self.format]

    @property
    def inputs(self) -> QuantizationArgs | None:
        return self.scheme.input_activations

    @property
    def input_params(self) -> tuple[str, ...]:
        """The stored tensors the inputs' quantization needs (static parameters)."""
        if self.inputs is None:
            return ()
        dyn = self.inputs.dynamic
        return STATIC_PARAMS[dyn if isinstance(dyn, bool) else _value(dyn)]


class CTConfig:
    """A checkpoint's compressed-tensors `quantization_config`, checked (`where`: config.json)."""

    def __init__(self, qc: dict, where: str):
        from compressed_tensors.quantization import QuantizationConfig
        from pydantic import ValidationError

        self.where = where
        try:
            config = QuantizationConfig.model_validate(qc)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"] if "[" not in str(p))
            raise UserError(f"model.path: '{where}': quantization_config.{loc}: {err['msg']}") from None
        except (NotImplementedError, ValueError, TypeError) as e:  # the library's own refusals
            raise UserError(f"model.path: '{where}': quantization_config: {str(e).splitlines()[0]}") from None
        for key in ("sparsity_config", "transform_config"):
            if qc.get(key):
                raise UserError(f"model.path: '{where}': quantization_config.{key} is not read (only an empty one)")
        if config.kv_cache_scheme is not None:
            raise UserError(f"model.path: '{where}': quantization_config.kv_cache_scheme (KV-cache quantization) "
                            "is not simulated; evaluate a checkpoint without it")
        self.groups = [self._group(name, scheme, str(qc.get("format")))
                       for name, scheme in config.config_groups.items()]
        if not self.groups:
            raise UserError(f"model.path: '{where}': quantization_config has no config_groups")
        self.ignore = list(config.ignore or [])
        self._of: dict[str, Group] = {}  # quantized linear -> its group (set by `parts`)

    def _group(self, name: str, scheme: QuantizationScheme, top: str) -> Group:
        at = f"model.path: '{self.where}': quantization_config.config_groups.{name}"
        fmt = _value(scheme.format) if scheme.format is not None else top
        if fmt not in MARKERS:
            raise UserError(f"{at}: format '{fmt}' is not read (readable: {', '.join(sorted(MARKERS))})")
        w = scheme.weights
        if w is None:
            raise UserError(f"{at}: quantizes no weights (only weight-quantized groups are read)")
        if _value(w.strategy) not in WEIGHT_STRATEGIES[fmt]:
            raise UserError(f"{at}.weights.strategy '{_value(w.strategy)}' is not read in format '{fmt}' "
                            f"(readable: {', '.join(WEIGHT_STRATEGIES[fmt])})")
        want = "float" if fmt in FLOAT_FORMATS else "int" if fmt in INT_FORMATS else _value(w.type)
        if _value(w.type) != want:
            raise UserError(f"{at}: {_value(w.type)} weights cannot be stored as format '{fmt}'")
        if scheme.output_activations is not None:
            raise UserError(f"{at}.output_activations: output activation quantization is not simulated")
        a = scheme.input_activations
        if a is not None:
            dyn = a.dynamic if isinstance(a.dynamic, bool) else _value(a.dynamic)
            if _value(a.strategy) not in INPUT_STRATEGIES[dyn]:
                how = {True: "dynamic", "local": "dynamic local", False: "static"}[dyn]
                raise UserError(f"{at}.input_activations.strategy '{_value(a.strategy)}' is not read for {how} "
                                f"inputs (readable: {', '.join(INPUT_STRATEGIES[dyn])})")
            if dyn is False and not a.symmetric:
                raise UserError(f"{at}.input_activations: asymmetric static inputs (input_zero_point) are not read")
        return Group(name, scheme, fmt)

    def group_of(self, linear: str, module: nn.Module | None) -> Group | None:
        """The config group that quantizes `linear` (None: not targeted, or ignored)."""
        from compressed_tensors.utils.match import is_match

        if module is None:
            return None
        return next((g for g in self.groups if is_match(linear, module, g.scheme.targets, self.ignore)), None)

    def parts(self, linear: str, present, module: nn.Module | None) -> list[str] | None:
        """The stored tensor names of `linear` when a group quantizes it (UserError when the
        group's tensors are not there), else None (a dense `.weight`)."""
        group = self.group_of(linear, module)
        if group is None or not present(f"{linear}.{group.marker}"):
            return None
        if group.marker == "weight" and not present(f"{linear}.weight_scale"):
            raise UserError(f"model.path: '{linear}.weight_scale' is missing from the safetensors files (config "
                            f"group {group.name} quantizes '{linear}' as {group.format})")
        missing = [s for s in group.input_params if not present(f"{linear}.{s}")]
        if missing:
            raise UserError(f"model.path: '{linear}.{missing[0]}' is missing from the safetensors files (config "
                            f"group {group.name} quantizes its inputs statically)")
        self._of[linear] = group
        return [f"{linear}.{s}" for s in SUFFIXES if present(f"{linear}.{s}")]

    def pack_config(self, linear: str) -> dict | None:
        """What `model.packed.compressed_tensors` reads a pack-quantized `linear` with (its
        group's bits); None for the other formats (`weight`)."""
        group = self._of[linear]
        if group.format != "pack-quantized":
            return None
        return {"config_groups": {group.name: {"weights": {"num_bits": group.scheme.weights.num_bits}}}}

    def weight(self, linear: str, t: dict[str, Tensor]) -> Tensor:
        """The float32 [out, in] weight of a quantized `linear` (not pack-quantized: `pack_config`)
        from its tensors by suffix."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        group = self._of[linear]
        args = group.scheme.weights
        if group.marker == "weight_packed":  # NVFP4 / MXFP4
            from compressed_tensors.compressors.mx_utils import decompress_mx_scale
            from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

            packed = t["weight_packed"]
            codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
            scale = t["weight_scale"]
            scale = decompress_mx_scale(scale) if group.format == "mxfp4-pack-quantized" else scale
            gscale = t.get("weight_global_scale")
            return dequantize(x_q=codes, scale=scale.float(), args=args, dtype=torch.float32,
                              global_scale=None if gscale is None else gscale.float())
        state = {"weight": t["weight"], "weight_scale": t["weight_scale"].float()}
        if "weight_zero_point" in t:
            state["weight_zero_point"] = t["weight_zero_point"]
        compressor = BaseCompressor.get_value_from_registry(group.format)
        return compressor.decompress(state, group.scheme)["weight"].float()

    def inputs(self, linear: str, t: dict[str, Tensor]) -> tuple[QuantizationArgs, dict[str, Tensor]] | None:
        """The input quantization of a quantized `linear`: the library's args and the stored
        static parameters (by suffix, as stored: `parts` checked they are); None when its group
        has none."""
        group = self._of.get(linear)
        if group is None or group.inputs is None:
            return None
        return group.inputs, {s: t[s] for s in group.input_params}

    def described_inputs(self) -> str | None:
        """How the groups quantize inputs, in words (`export.formats.describe_inputs`), or None."""
        words = [describe_inputs(g.inputs.model_dump(mode="json")) for g in self.groups if g.inputs is not None]
        return "; ".join(dict.fromkeys(words)) or None
