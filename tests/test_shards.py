"""Planned shards written by `write_shard` + `write_index` read back exactly with safetensors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shardquant.export.shards import TensorSpec, plan_shards, shard_names, write_index, write_shard
from shardquant.model.checkpoint import read_header


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("hash_aside", [False, True], ids=["hash-inline", "hash-aside"])
def test_round_trip_many_dtypes(tmp_path, hash_aside):
    """Also: the sha256 returned is the file's, whether the bytes are hashed as they are
    written or in a second thread beside the write."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=g),
        "b.bf16": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(5, generator=g).half(),
        "d.codes": torch.randint(-2**31, 2**31 - 1, (7, 3), dtype=torch.int32, generator=g),
        "e.u8": torch.randint(0, 255, (11,), dtype=torch.uint8, generator=g),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.big": torch.randn(64, 64, generator=g),
    }
    shards = plan_shards(specs_of(tensors), 4096)
    names = shard_names(len(shards))
    for name, specs in zip(names, shards, strict=True):
        digest = write_shard(tmp_path / name, specs, (tensors[s.name] for s in specs), hash_aside=hash_aside)
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(), name
    weight_map = write_index(tmp_path, shards)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(names) > 1
    assert [f.name for f in files] == sorted(names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:
        read_header(f)  # our validator accepts it too
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for n, t in tensors.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n
    with safe_open(str(tmp_path / weight_map["a.weight"]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.tmp"))


def test_plan_respects_budget():
    specs = [TensorSpec(f"t{i}", torch.float32, (100,)) for i in range(10)]  # 400 bytes each
    shards = plan_shards(specs, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert [len(s) for s in plan_shards(specs, 100)] == [1] * 10  # a tensor over budget gets its own shard
    assert sum(len(s) for s in plan_shards(specs, 10**9)) == 10


@pytest.mark.parametrize("hash_aside", [False, True], ids=["hash-inline", "hash-aside"])
def test_errors_on_plan_mismatch(tmp_path, hash_aside):
    t = torch.zeros(2, 2)
    specs = [TensorSpec("x", torch.float32, (2, 2)), TensorSpec("y", torch.float32, (2, 2))]
    path = tmp_path / shard_names(1)[0]
    with pytest.raises(ValueError, match="tensor 'y' is torch.float16 \\(2, 2\\), planned torch.float32"):
        write_shard(path, specs, [t, t.half()], hash_aside=hash_aside)
    with pytest.raises(ValueError):  # fewer tensors than planned
        write_shard(path, specs, [t], hash_aside=hash_aside)
    with pytest.raises(ValueError):  # more tensors than planned
        write_shard(path, specs, [t, t, t], hash_aside=hash_aside)
    assert not list(tmp_path.iterdir()), "an incomplete shard leaves nothing behind"
