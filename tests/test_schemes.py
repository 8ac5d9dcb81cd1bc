"""`quant.scheme` presets and the float weight quantizers, against compressed-tensors' own
presets, qparams and quantize/dequantize."""

from __future__ import annotations

import pytest

from shardquant.config import QuantConfig
from shardquant.errors import UserError
from shardquant.presets import PRESETS

ct_scheme = pytest.importorskip("compressed_tensors.quantization.quant_scheme")


# --- presets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_table_matches_library(name):
    """Every row of the torch-free table says what the library's preset of that name holds."""
    lib = ct_scheme.preset_name_to_scheme(name, ["Linear"])
    p, w = PRESETS[name], lib.weights
    assert (p.weight_type, p.bits, p.strategy, p.symmetric) == (w.type, w.num_bits, w.strategy, w.symmetric)
    if w.strategy == "block":
        assert [p.block_rows, p.group_size] == list(w.block_structure)
    else:
        assert p.group_size == (w.group_size or -1) and p.block_rows == 1
    scale = {None: "float", "torch.float8_e4m3fn": "fp8", "torch.uint8": "e8m0"}[
        None if w.scale_dtype is None else str(w.scale_dtype)]
    assert p.scale == scale
    assert (p.activations is None) == (lib.input_activations is None)


def test_issue_presets_all_known():
    """The presets issue 19 names exist in the installed library and in the table."""
    wanted = ["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "NVFP4",
              "MXFP4A16", "MXFP4", "W4AFP8"]
    assert all(ct_scheme.is_preset_scheme(n) for n in wanted)
    assert set(wanted) == set(PRESETS)


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_scheme_objects_are_the_library_presets(name, method):
    """quantization_scheme gives the library's own preset (plus actorder: weight for GPTQ)."""
    from compressed_tensors.quantization import QuantizationScheme

    from shardquant.schemes import quantization_scheme

    got = quantization_scheme(QuantConfig(scheme=name.lower(), method=method))
    ref = ct_scheme.preset_name_to_scheme(name, ["Linear"])
    if method == "gptq":
        ref.weights.actorder = "weight"
    assert isinstance(got, QuantizationScheme) and got == ref


def test_weights_only_drops_activations():
    from shardquant.schemes import quantization_scheme

    got = quantization_scheme(QuantConfig(scheme="FP8_DYNAMIC", weights_only=True, method="rtn"))
    ref = ct_scheme.preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert got.weights == ref.weights and got.input_activations is None and ref.input_activations is not None


def test_no_scheme_is_todays_default():
    """No preset: the explicit keys as before; the scheme object is W4A16 refined by them."""
    from shardquant.schemes import quantization_scheme

    q = QuantConfig()
    assert (q.scheme, q.bits, q.group_size, q.symmetric, q.kind) == (None, 4, 128, True, "int")
    w = quantization_scheme(QuantConfig(bits=8, group_size=-1, symmetric=False, method="rtn")).weights
    assert (w.num_bits, w.strategy, w.group_size, w.symmetric, w.type) == (8, "channel", None, False, "int")


def test_explicit_keys_refine_integer_presets():
    q = QuantConfig(scheme="W8A16", group_size=64, symmetric=False)
    assert (q.bits, q.group_size, q.symmetric) == (8, 64, False)
    q = QuantConfig(scheme="W8A8", weights_only=True)
    assert (q.bits, q.group_size, q.symmetric, q.kind) == (8, -1, True, "int")
    q = QuantConfig(scheme="NVFP4A16", method="rtn")
    assert (q.bits, q.group_size, q.kind) == (4, 16, "nvfp4")
    assert QuantConfig(scheme="MXFP4A16").kind == "mxfp4"
    assert QuantConfig(scheme="FP8_BLOCK", weights_only=True).kind == "fp8"


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"scheme": "W5A5"}, "quant.scheme: unknown preset 'W5A5'"),
        ({"scheme": "W8A16", "bits": 4}, "quant.bits: 4 contradicts quant.scheme W8A16 (8-bit weights)"),
        ({"scheme": "NVFP4A16", "group_size": 32}, "quant.group_size: 32 contradicts quant.scheme NVFP4A16"),
        ({"scheme": "MXFP4A16", "symmetric": False}, "quant.symmetric: float scheme MXFP4A16 is symmetric only"),
        ({"scheme": "FP8_DYNAMIC"}, "quant.scheme: FP8_DYNAMIC also quantizes input activations"),
        ({"scheme": "FP8", "weights_only": True}, "quant.scheme: FP8's tensor weight scales are not implemented yet"),
        ({"scheme": "NVFP4A16", "method": "awq"}, "quant.method: awq is not implemented for float scheme"),
        ({"scheme": "MXFP4A16", "mse": True}, "quant.mse: the range search is for integer schemes"),
        ({"weights_only": True}, "quant.weights_only: needs quant.scheme"),
    ],
)
def test_contradictions_are_user_errors(tmp_path, quant, message):
    """A contradiction is one UserError line naming the key."""
    from shardquant.config import build_config

    with pytest.raises(UserError) as e:
        build_config({"model": {"path": str(tmp_path)}, "quant": quant})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
