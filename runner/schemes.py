"""`quant.scheme` as compressed-tensors' own `QuantizationScheme`, refined by the explicit keys.

Imports compressed-tensors (and so torch): the config validates presets through the torch-free
table of `shardquant.presets`; this module builds the library's objects when a run needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from shardquant.config import GPTQ_METHODS, QuantConfig
from shardquant.errors import UserError

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme


def quantization_scheme(q: QuantConfig, targets: Sequence[str] = ("Linear",)) -> QuantizationScheme:
    """The library's scheme of ``q``: ``preset_name_to_scheme(q.scheme)`` (W4A16 when unset) with
    ``bits``/``group_size``/``symmetric`` applied to its weights, GPTQ act-order recorded as
    ``actorder: weight``, and with ``weights_only`` no input activations."""
    try:
        from compressed_tensors.quantization import (
            ActivationOrdering,
            QuantizationArgs,
            preset_name_to_scheme,
        )
    except ImportError as e:
        raise UserError(f"quant.scheme needs the compressed-tensors package ({e})") from None
    scheme = preset_name_to_scheme(q.scheme or "W4A16", list(targets))
    weights = scheme.weights
    if weights.type == "int":  # the explicit keys refine an integer preset; validated again
        args = weights.model_dump()
        args["num_bits"], args["symmetric"] = q.bits, q.symmetric
        if q.group_size == -1:
            args.update(strategy="channel", group_size=None)
        else:
            args.update(strategy="group", group_size=q.group_size)
        weights = QuantizationArgs.model_validate(args)
    if q.method in GPTQ_METHODS and q.act_order:
        # groups stay contiguous (static groups): calibration order only. A float preset's
        # args are copied as they are (validating them again would reset their zp_dtype).
        weights = weights.model_copy(update={"actorder": ActivationOrdering.WEIGHT.value})
    update = {"weights": weights}
    if q.weights_only:
        update["input_activations"] = None
    return scheme.model_copy(update=update)
