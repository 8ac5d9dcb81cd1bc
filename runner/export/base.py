"""Export formats: how a run's quantized blocks become checkpoint tensors and files.

One `Exporter` subclass per `export.format`, writing the layout its `formats.Layout` defines.
The pipeline asks it, before any weight is read, to `check` the scheme and to `plan` every
tensor of the checkpoint (so shards stream with constant memory, see `shards.py`); then, block
by block, for that block's tensors in plan order; then for the tensors outside the blocks; and
finally for the non-tensor files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from shardquant.algorithms.quantizer import QuantizedWeight
from shardquant.config import QuantConfig
from shardquant.errors import UserError
from shardquant.export.formats import BlockLinears, FakeLayout, Layout, quantized_linears
from shardquant.export.shards import ST_DTYPES, TensorSpec, write_json_atomic
from shardquant.model.source import SIDE_FILES, ModelSource

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ST_TO_TORCH = {name: dtype for dtype, name in ST_DTYPES.items()}


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer and generation-config files that exist in the source model dir."""
    copied = []
    for name in SIDE_FILES:
        src = source / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


class Exporter:
    """Base: the checkpoint mirrors the source's tensors (floats in the compute dtype)."""

    layout_class: ClassVar[type[Layout]] = FakeLayout
    # Whether `block_tensors` reads the solved linears' dequantized weights from the block
    # (the fake export), so they must be set there even when nothing runs through it again.
    reads_applied_weights: ClassVar[bool] = True

    def __init__(self, source: ModelSource, quant: QuantConfig):
        self.source = source
        self.quant = quant
        self.layout = self.layout_class(quant, DTYPE_NAMES[source.dtype])

    # --- what is quantized --------------------------------------------------------------

    def quantized_linears(self, index: int) -> list[str]:
        """Block-relative names of the linears of block `index` that get quantized."""
        adapter = self.source.adapter
        return quantized_linears(self.quant, adapter.blocks, index, self.source.block_linears(index))

    def source_spec(self, name: str) -> TensorSpec:
        """A source tensor as it is exported unchanged (floats in the compute dtype)."""
        info = self.source.index.infos[name]
        dtype = ST_TO_TORCH[info.dtype]
        return TensorSpec(name, self.source.tensor_dtype(name) if dtype.is_floating_point else dtype, info.shape)

    # --- the contract -------------------------------------------------------------------

    def check(self) -> None:
        """Raise UserError when this format cannot hold the configured scheme (the layout's
        first problem, the note `shardquant plan` prints)."""
        model = BlockLinears(self.source.adapter.blocks, self.source.num_blocks, self.source.linear_shapes())
        problem = self.layout.problem(model)
        if problem is not None:
            raise UserError(problem)

    def plan(self) -> list[TensorSpec]:
        """Every tensor of the checkpoint, in write order: blocks in order (names sorted within
        a block), then the tensors outside the blocks, sorted."""
        specs: list[TensorSpec] = []
        for i in range(self.source.num_blocks):
            specs += self.block_plan(i)
        return specs + self.other_plan()

    def other_plan(self) -> list[TensorSpec]:
        """The tensors outside the blocks (embedding, final norm, lm_head), sorted."""
        return [self.source_spec(n) for n in sorted(self.source.non_block_names())]

    def block_plan(self, index: int) -> list[TensorSpec]:
        return [self.source_spec(n) for n in self.source.index.names(self.source.adapter.block_prefix(index))]

    def block_tensors(
        self, index: int, block: nn.Module, results: dict[str, QuantizedWeight],
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of a finished block, in plan order. `block` holds fake-quantized weights;
        `inputs`: the static input parameters of its linears (`calib.inputs`), for the formats
        that store them."""
        name = f"{self.source.adapter.blocks}.{index}"
        state = block.state_dict()
        for k in sorted(state):
            yield f"{name}.{k}", state[k]

    def other_tensor(self, name: str) -> torch.Tensor:
        """One tensor outside the blocks (embedding, final norm, lm_head) as exported: the
        source's, in its export dtype (the shard assembly reads it from the source)."""
        t = self.source.read_tensors([name])[name]
        return t.to(self.source.tensor_dtype(name)) if t.is_floating_point() else t

    def config_json(self) -> dict:
        """The exported config.json: the source's, dtype set, no quantization_config."""
        raw = json.loads((self.source.root / "config.json").read_text())
        raw.pop("quantization_config", None)
        raw.pop("torch_dtype", None)
        raw["dtype"] = DTYPE_NAMES[self.source.dtype]
        return raw

    def write_files(self, dest: Path) -> None:
        """config.json and the tokenizer / generation-config files."""
        write_json_atomic(dest / "config.json", self.config_json())
        copy_side_files(self.source.root, dest)


class FakeExporter(Exporter):
    """`fake`: dequantized weights in the compute dtype; any transformers loads it as is."""


class PackedExporter(Exporter):
    """Base of the packed formats: each quantized linear's `weight` is replaced by the layout's
    tensors (`linear_specs` / `linear_tensors`); every other tensor is exported as is."""

    reads_applied_weights = False

    def linear_specs(self, name: str, out_features: int, in_features: int) -> list[TensorSpec]:
        """The tensors that stand for the quantized linear `name` (full module name)."""
        return [
            TensorSpec(f"{name}.{p.suffix}", ST_TO_TORCH[p.dtype], p.shape)
            for p in self.layout.parts(out_features, in_features)
        ]

    def linear_tensors(
        self, name: str, weight: QuantizedWeight, inputs: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Those tensors, by full name, for a solved linear (with its static input parameters)."""
        raise NotImplementedError

    def block_plan(self, index: int) -> list[TensorSpec]:
        prefix = self.source.adapter.block_prefix(index)
        quantized = {f"{prefix}{n}.weight" for n in self.quantized_linears(index)}
        specs: list[TensorSpec] = []
        for name in self.source.index.names(prefix):
            if name in quantized:
                out_f, in_f = self.source.index.infos[name].shape
                specs += self.linear_specs(name.removesuffix(".weight"), out_f, in_f)
            else:
                specs.append(self.source_spec(name))
        return sorted(specs, key=lambda s: s.name)

    def block_tensors(
        self, index: int, block: nn.Module, results: dict[str, QuantizedWeight],
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = self.source.adapter.block_prefix(index)
        wanted = self.quantized_linears(index)
        if set(results) != set(wanted):
            raise ValueError(
                f"block {index}: solved linears {sorted(results)} differ from the planned {sorted(wanted)}"
            )
        state = block.state_dict()
        for lin in wanted:
            state.pop(f"{lin}.weight")
        tensors = {f"{prefix}{k}": v for k, v in state.items()}
        for lin in wanted:
            tensors.update(self.linear_tensors(f"{prefix}{lin}", results[lin], (inputs or {}).get(lin)))
        for spec in self.block_plan(index):
            yield spec.name, tensors.pop(spec.name)
        if tensors:
            raise ValueError(f"block {index}: tensors {sorted(tensors)} are not in the checkpoint plan")

    def unquantized_linears(self) -> list[str]:
        """Full names of the model's nn.Linear modules that stay in full precision (lm_head,
        `quant.ignore`d ones), in model order, with every sparse block's router (not an
        nn.Linear in transformers 5, a linear layer to readers such as vLLM)."""
        adapter = self.source.adapter
        quantized = {f"{adapter.blocks}.{i}.{n}" for i in range(self.source.num_blocks) for n in self.quantized_linears(i)}
        routers = set()
        if adapter.experts is not None:
            routers = {f"{adapter.blocks}.{i}.{adapter.experts.router}" for i in range(self.source.num_blocks)
                       if f"{adapter.blocks}.{i}.{adapter.experts.router}.weight" in self.source.index}
        return [
            name for name, mod in self.source.skeleton.named_modules()
            if (isinstance(mod, nn.Linear) and name not in quantized) or name in routers
        ]


def check_scheme(name: str, weight: QuantizedWeight, quant: QuantConfig) -> None:
    """ValueError unless `weight` was quantized with the configured bits, group and symmetry."""
    spec = weight.spec
    if (spec.bits, spec.group_size, spec.symmetric) != (quant.bits, quant.group_size, quant.symmetric):
        raise ValueError(f"{name}: quantized as {spec}, but the config says {quant.bits} bits, "
                         f"group {quant.group_size}, symmetric {quant.symmetric}")


def float16_scales(name: str, scales: torch.Tensor) -> torch.Tensor:
    """`scales` as float16; ValueError when that would change a value."""
    half = scales.to(torch.float16)
    if not torch.equal(half.float(), scales.float()):
        raise ValueError(f"{name}: scales are not float16 values (QuantSpec.scale_dtype)")
    return half


def trivial_g_idx(weight: QuantizedWeight) -> bool:
    """True when every input column's group is its position's (`j // group_len`): the layout
    of formats without a g_idx."""
    n = weight.codes.shape[1]
    expected = torch.arange(n, device=weight.g_idx.device) // weight.spec.group_len(n)
    return bool(torch.equal(weight.g_idx.to(torch.int64), expected))
