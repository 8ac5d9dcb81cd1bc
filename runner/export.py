"""The non-tensor files of an exported checkpoint: config.json, tokenizer, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .model import SIDE_FILES, ModelSource
from .shards import TensorSpec, write_json_atomic

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


_ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def fake_plan(source: ModelSource) -> list[TensorSpec]:
    """Every tensor of a `fake` export in write order: blocks in order (names sorted within a
    block), then the rest (embedding, final norm, lm_head) sorted; floats in the compute dtype."""

    def spec(name: str) -> TensorSpec:
        info = source.index.infos[name]
        dtype = _ST_TO_TORCH[info.dtype]
        if dtype.is_floating_point:
            dtype = source.dtype
        return TensorSpec(name, dtype, info.shape)

    specs = []
    for i in range(source.num_blocks):
        specs += [spec(n) for n in source.index.names(source.adapter.block_prefix(i))]
    specs += [spec(n) for n in sorted(source.non_block_names())]
    return specs


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer and generation-config files that exist in the source model dir."""
    copied = []
    for name in SIDE_FILES:
        src = source / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def write_fake_checkpoint_files(source: ModelSource, dest: Path) -> None:
    """config.json (source's, dtype set to the exported one, no quantization_config) and side files."""
    raw = json.loads((source.root / "config.json").read_text())
    raw.pop("quantization_config", None)
    dtype = _DTYPE_NAMES[str(source.dtype)]
    raw["dtype"] = dtype
    raw.pop("torch_dtype", None)
    write_json_atomic(dest / "config.json", raw)
    copy_side_files(source.root, dest)
