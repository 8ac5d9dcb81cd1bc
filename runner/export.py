"""The non-tensor files of an exported checkpoint: config.json, tokenizer, generation config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .model import SIDE_FILES, ModelSource
from .shards import write_json_atomic

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


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
