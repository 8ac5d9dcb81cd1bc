"""`export.format: compressed-tensors`: the pack-quantized layout that transformers (with the
compressed-tensors package) and vLLM load.

Per quantized linear `<name>` (conventions of compressed-tensors 0.20, which this module uses
for the config classes and the packing itself):

- `<name>.weight_packed`: int32 [out, ceil(in * bits / 32)], 32 // bits codes per word along
  the input dim, little end first. The library packs a signed code `c` in
  [-2**(bits-1), 2**(bits-1) - 1] as `c + 2**(bits-1)`, which is exactly our unsigned code.
- `<name>.weight_scale`: [out, n_groups] ([out, 1] per channel) in the compute dtype, the dtype
  the library gives the scale (the weight's dtype).
- `<name>.weight_zero_point`, asymmetric only: our zero minus 2**(bits-1) (the library's
  signed int8 zero point), packed like the codes but along the output dim:
  int32 [ceil(out * bits / 32), n_groups]. Symmetric schemes store none (zero is 0).
- `<name>.weight_shape`: int64 [2], (out, in).

Dequantization is `(code - zero) * scale` with the group of column j being `j // group_size`.
There is no g_idx: compressed-tensors 0.20 removed activation-ordered groups (`actorder:
group`), so GPTQ act-order needs `quant.static_groups` (the config then says `actorder:
weight`, calibration-only reordering) or a per-channel scheme. Bit widths are limited to 2, 4
and 8: for 3, 5, 6 and 7 the library's packing changed between versions (dense since 0.20,
32 // bits codes per word before), so such a checkpoint would read differently depending on
the reader; vLLM's kernels serve 4 and 8 bits.

Float schemes (FP8_DYNAMIC, FP8_BLOCK, NVFP4*, MXFP4*) and schemes that quantize input
activations (W8A8, W4AFP8, ...) are written in the format the library's
`infer_module_format` picks (`naive-quantized` for fp8 weights without activations,
`float-quantized` with them, `int-quantized` for integer weights with activations,
`nvfp4-pack-quantized`, `mxfp4-pack-quantized`), always from the solved codes, never by
re-quantizing the dequantized weight. The naive formats store the codes as they are (their
compressor's `compress` is the library's `quantize`, cast to the codes' dtype); the packed FP4
formats store them two to a byte (`floatq.pack_e2m1`, the library's nibble order) with the
scales as their compressor's `_compress_scale` stores them. Either way the scales and static
input parameters (FP8's `input_scale`, NVFP4's `input_global_scale`, calibrated by
`calib.inputs`) are those the compressor would be handed, keys and dtypes as it returns them;
tests/test_export_float.py checks every byte against the compressor's own output.
`formats.float_parts` and `formats.input_parts` list the tensors.
The config's `input_activations` are the preset's.

The tensors' names, dtypes and shapes and these limits are defined once, in
`formats.CompressedTensorsLayout`; this module writes them.
"""

from __future__ import annotations

import functools

import torch

from shardquant.algorithms.floatq import FloatQuantizedWeight, pack_e2m1
from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.errors import UserError
from shardquant.export.base import PackedExporter, check_scheme, trivial_g_idx
from shardquant.export.formats import CompressedTensorsLayout


@functools.cache
def _library() -> dict:
    """The compressed-tensors names this format is built from (UserError when missing)."""
    try:
        import compressed_tensors
        from compressed_tensors.base import (
            COMPRESSION_VERSION_NAME,
            QUANTIZATION_METHOD,
            QUANTIZATION_METHOD_NAME,
            SPARSITY_CONFIG_NAME,
            TRANSFORM_CONFIG_NAME,
        )
        from compressed_tensors.compressors.pack_quantized import pack_to_int32
        from compressed_tensors.config import CompressionFormat
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            QuantizationStatus,
        )
    except ImportError as e:
        raise UserError(
            "export.format: 'compressed-tensors' needs the compressed-tensors package >= 0.20 "
            f"({e}); pip install 'compressed-tensors>=0.20'"
        ) from None
    return {
        "version": compressed_tensors.__version__,
        "COMPRESSION_VERSION_NAME": COMPRESSION_VERSION_NAME,
        "QUANTIZATION_METHOD": QUANTIZATION_METHOD,
        "QUANTIZATION_METHOD_NAME": QUANTIZATION_METHOD_NAME,
        "SPARSITY_CONFIG_NAME": SPARSITY_CONFIG_NAME,
        "TRANSFORM_CONFIG_NAME": TRANSFORM_CONFIG_NAME,
        "pack_to_int32": pack_to_int32,
        "PACK_QUANTIZED": CompressionFormat.pack_quantized.value,
        "QuantizationArgs": QuantizationArgs,
        "QuantizationConfig": QuantizationConfig,
        "QuantizationScheme": QuantizationScheme,
        "COMPRESSED": QuantizationStatus.COMPRESSED,
    }


class CompressedTensorsExporter(PackedExporter):
    """`compressed-tensors`: int weights packed into int32 ("pack-quantized"), W{bits}A16."""

    layout_class = CompressedTensorsLayout

    def check(self) -> None:
        super().check()
        _library()

    # --- config.json ---------------------------------------------------------------------

    def quantization_args(self):
        """The weights' `QuantizationArgs`: the library's preset (W4A16 unless `quant.scheme`
        names another) refined by bits/group_size/symmetric, `actorder: weight` after GPTQ
        act-order (groups stay contiguous: calibration order only)."""
        _library()
        from shardquant.schemes import quantization_scheme

        return quantization_scheme(self.quant).weights

    @functools.cached_property
    def library_scheme(self):
        """The library's `QuantizationScheme` with the format the library infers for it, and
        that format's compressor, for float schemes and schemes that quantize activations too
        (None, None for weight-only integer schemes: packed here, as before presets)."""
        if self.quant.kind == "int" and not self.quant.activations:
            return None, None
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.compressors.format import infer_module_format

        from shardquant.schemes import quantization_scheme

        scheme = quantization_scheme(self.quant)
        fmt = infer_module_format(torch.nn.Linear, scheme).value
        return scheme.model_copy(update={"format": fmt}), BaseCompressor.get_value_from_registry(fmt)

    def quantization_config(self):
        """The checkpoint's `QuantizationConfig`: one group of every nn.Linear, minus the
        ones left in full precision (lm_head and `quant.ignore`), by full name."""
        lib = _library()
        scheme, _ = self.library_scheme
        if scheme is None:
            scheme = lib["QuantizationScheme"](
                targets=["Linear"], weights=self.quantization_args(), format=lib["PACK_QUANTIZED"]
            )
        return lib["QuantizationConfig"](
            config_groups={"group_0": scheme},
            format=scheme.format,
            quantization_status=lib["COMPRESSED"],
            ignore=self.unquantized_linears(),
        )

    def config_json(self) -> dict:
        """The source config with `quantization_config` as compressed-tensors'
        `ModelCompressor.update_config` writes it."""
        lib = _library()
        raw = super().config_json()
        raw["quantization_config"] = {
            lib["COMPRESSION_VERSION_NAME"]: lib["version"],
            lib["QUANTIZATION_METHOD_NAME"]: lib["QUANTIZATION_METHOD"],
            lib["SPARSITY_CONFIG_NAME"]: {},
            lib["TRANSFORM_CONFIG_NAME"]: {},
            **self.quantization_config().model_dump(mode="json", exclude={"quant_method"}),
        }
        return raw

    # --- tensors -------------------------------------------------------------------------

    def linear_tensors(
        self, name: str, weight: QuantizedWeight | FloatQuantizedWeight, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        if self.library_scheme[0] is not None:
            return self.library_tensors(name, weight, inputs or {})
        q = self.quant
        check_scheme(name, weight, q)
        if not trivial_g_idx(weight):
            raise ValueError(f"{name}: act-order groups (non-trivial g_idx) cannot be stored in compressed-tensors")
        pack = _library()["pack_to_int32"]
        offset = 2 ** (q.bits - 1)
        out = {
            f"{name}.weight_packed": pack((weight.codes.to(torch.int16) - offset).to(torch.int8), q.bits),
            f"{name}.weight_scale": weight.scales.to(self.source.dtype),  # the compute dtype
            f"{name}.weight_shape": torch.tensor(tuple(weight.codes.shape), dtype=torch.int64),
        }
        if not q.symmetric:
            zero = (weight.zeros - offset).to(torch.int8)
            out[f"{name}.weight_zero_point"] = pack(zero, q.bits, packed_dim=0)
        return out

    def library_tensors(
        self, name: str, weight: QuantizedWeight | FloatQuantizedWeight, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A linear of a float or weight-activation scheme, with its static input parameters
        (`calib.inputs`; ValueError unless they are the layout's): integer weights (always
        `int-quantized`) as the library's signed codes, float ones by `float_tensors`."""
        scheme, _ = self.library_scheme
        want = {p.suffix for p in self.layout.parts(*weight_shape(weight)) if p.suffix.startswith("input_")}
        if set(inputs) != want:
            raise ValueError(f"{name}: input parameters {sorted(inputs)}, but the scheme stores {sorted(want)}")
        if isinstance(weight, QuantizedWeight):
            check_scheme(name, weight, self.quant)
            if not trivial_g_idx(weight):
                raise ValueError(f"{name}: act-order groups (non-trivial g_idx) cannot be stored in compressed-tensors")
            if not self.stores_codes:  # the library stores integer weights with activations as int-quantized
                raise ValueError(f"{name}: integer weights in the packed format {scheme.format} are written unpacked here")
            scales = weight.scales.to(self.source.dtype)  # the stored scales, which the codes are rounded on
            codes = weight.codes.to(torch.int16) - 2 ** (self.quant.bits - 1)  # the library's signed codes
            out = {"weight_scale": scales, **inputs, "weight": codes.to(scheme.weights.pytorch_dtype())}
            return {f"{name}.{k}": v.contiguous() for k, v in out.items()}
        return self.float_tensors(name, weight, inputs)

    @functools.cached_property
    def stores_codes(self) -> bool:
        """Whether the format stores the codes as they are (the library's naive compressors:
        `naive-`, `int-` and `float-quantized`, whose `compress` is `quantize` of the weight,
        cast to the codes' dtype); else the format packs them (FP4: `floatq.pack_e2m1`)."""
        from compressed_tensors.compressors.naive_quantized import NaiveQuantizationCompressor

        _, compressor = self.library_scheme
        return compressor is not None and issubclass(compressor, NaiveQuantizationCompressor)

    def float_tensors(
        self, name: str, weight: FloatQuantizedWeight, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """A float weight's tensors, from the solved values: as they are where the format stores
        them so (`stores_codes`: fp8), else (FP4) packed two to a byte by `floatq.pack_e2m1`, the
        scales as the format's compressor stores them (`_compress_scale`: FP8 for NVFP4, E8M0
        exponents for MXFP4). Both are byte for byte what the library's compressor writes from
        the dequantized weight (tests/test_export_float.py), without re-quantizing it."""
        scheme, compressor = self.library_scheme
        if scheme is None or weight.spec.kind != self.quant.kind:
            raise ValueError(f"{name}: quantized as {weight.spec}, but the config says quant.scheme {self.quant.scheme}")
        spec = weight.spec
        state = dict(inputs or {})
        if spec.kind == "fp8":
            scales = weight.block_scales() if spec.block_rows > 1 else weight.scales
            if spec.per_tensor:
                scales = scales[:1, 0]  # the library's [1]
            state["weight_scale"] = scales.to(self.source.dtype)  # exact: rounded to it when solved
        else:
            state["weight_scale"] = weight.scales
        if weight.global_scale is not None:
            state["weight_global_scale"] = weight.global_scale[:1].clone()
        if self.stores_codes:
            out = {**state, "weight": weight.values}
        else:  # packed FP4: the solved codes packed, the scales as the format's compressor stores them
            scale = compressor._compress_scale(state.pop("weight_scale"), scheme.weights)
            out = {**state, "weight_packed": pack_e2m1(weight.values), "weight_scale": scale}
        return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


def weight_shape(weight: QuantizedWeight | FloatQuantizedWeight) -> tuple[int, int]:
    """(out, in) of a solved linear."""
    t = weight.values if isinstance(weight, FloatQuantizedWeight) else weight.codes
    return t.shape[0], t.shape[1]
