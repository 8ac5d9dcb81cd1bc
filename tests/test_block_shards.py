"""`export.shard_size: block`: each block's state file becomes its shard without being written
again, and the checkpoint holds the same tensors, reloads in transformers + compressed-tensors
to the same logits and verifies against its manifest, like a size-sharded one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint, run_config
from safetensors.torch import load_file

from shardquant.cli import main
from shardquant.config import build_config
from shardquant.export.manifest import verify
from shardquant.export.shards import TensorSpec, adopt_shard, write_shard
from shardquant.pipeline import quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _shard(path: Path, tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_shard(path, specs, tensors.values())
    return specs


TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.codes": torch.arange(5, dtype=torch.int32)}


def test_adopt_links_the_written_file(tmp_path):
    specs = _shard(tmp_path / "state.safetensors", TENSORS)
    assert adopt_shard(tmp_path / "state.safetensors", tmp_path / "shard.safetensors", specs)
    assert os.path.samefile(tmp_path / "state.safetensors", tmp_path / "shard.safetensors")
    got = load_file(tmp_path / "shard.safetensors")
    assert all(torch.equal(got[n], t) for n, t in TENSORS.items())


@pytest.mark.parametrize("plan", [
    {"a.weight": torch.zeros(3, 4, dtype=torch.float16), "b.codes": torch.zeros(5, dtype=torch.int32)},  # dtype
    {"a.weight": torch.zeros(4, 3), "b.codes": torch.zeros(5, dtype=torch.int32)},  # shape
    {"a.weight": torch.zeros(3, 4)},  # a tensor fewer
])
def test_adopt_refuses_a_file_of_another_plan(tmp_path, plan):
    _shard(tmp_path / "state.safetensors", TENSORS)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in plan.items()]
    assert not adopt_shard(tmp_path / "state.safetensors", tmp_path / "shard.safetensors", specs)
    assert not adopt_shard(tmp_path / "missing.safetensors", tmp_path / "shard.safetensors", specs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]


def test_adopt_copies_across_filesystems(tmp_path):
    """A hard link cannot cross filesystems (EXDEV): the bytes are copied, atomically."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temp directory")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        specs = _shard(Path(d) / "state.safetensors", TENSORS)
        assert adopt_shard(Path(d) / "state.safetensors", tmp_path / "shard.safetensors", specs)
        assert not os.path.samefile(Path(d) / "state.safetensors", tmp_path / "shard.safetensors")
        assert (Path(d) / "state.safetensors").read_bytes() == (tmp_path / "shard.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.safetensors"]


@pytest.fixture(scope="module")
def two_exports(tiny_models, texts, tmp_path_factory) -> dict:
    """The llama fixture quantized (GPTQ W4A16, compressed-tensors) twice: 100 KB shards and block shards."""
    out = {}
    for key, size in (("size", "100KB"), ("block", "block")):
        o = tmp_path_factory.mktemp(key) / "out"
        cfg = run_config(tiny_models["llama"], texts, o, calib={"n_samples": 8, "seq_len": 32},
                         eval={"enabled": False}, export={"format": "compressed-tensors", "shard_size": size})
        report = quantize(build_config(cfg), show_progress=False)
        out[key] = o
        out[f"{key}-report"] = report
    return out


def test_block_shards_hold_one_block_each_and_the_same_tensors(two_exports):
    model = two_exports["block"] / "model"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    by_shard: dict[str, set[str]] = {}
    for name, file in index["weight_map"].items():
        by_shard.setdefault(file, set()).add(name)
    blocks = sorted({n.split(".")[2] for n in index["weight_map"] if n.startswith("model.layers.")}, key=int)
    assert len(blocks) >= 2
    # shard k (1-based) holds exactly block k-1; the tensors outside the blocks come after
    for k, b in enumerate(blocks):
        names = by_shard[f"model-{k + 1:05d}-of-{len(by_shard):05d}.safetensors"]
        assert names == {n for n in index["weight_map"] if n.startswith(f"model.layers.{b}.")}
    assert len(by_shard) == len(blocks) + 1
    assert not any(n.startswith("model.layers.") for n in by_shard[f"model-{len(by_shard):05d}-of-{len(by_shard):05d}.safetensors"])
    a, b = read_checkpoint(two_exports["size"] / "model"), read_checkpoint(model)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    assert verify(model) == []
    assert not (two_exports["block"] / "state" / "blocks").exists()
    # the block shards were the state files, not written again; a size-sharded export adopts none
    assert two_exports["block-report"]["export"]["shards"] == len(by_shard)
    assert two_exports["block-report"]["export"]["adopted_shards"] == len(blocks)
    assert two_exports["size-report"]["export"]["adopted_shards"] == 0


def test_block_shards_reload_to_the_same_logits(two_exports, texts):
    from test_export_compressed import load, windows

    w = windows(two_exports["size"] / "model", texts)
    with torch.no_grad():
        la = load(two_exports["size"] / "model")(w).logits
        lb = load(two_exports["block"] / "model")(w).logits
    assert torch.equal(la, lb)


def test_bad_shard_size_names_the_choices(tiny_models, texts, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out")))
    assert main(["quantize", str(cfg), "--export.shard_size=blocks"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("shardquant: error: export.shard_size: ") and "'block'" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("fmt", "quant"), [
    ("fake", {"method": "rtn", "bits": 4, "group_size": 32}),
    ("gptq", {"method": "rtn", "bits": 4, "group_size": 32}),
    ("awq", {"method": "rtn", "bits": 4, "group_size": 32}),
    ("compressed-tensors", {"method": "rtn", "scheme": "W8A8"}),
    ("compressed-tensors", {"method": "rtn", "scheme": "FP8_DYNAMIC"}),
    ("compressed-tensors", {"method": "rtn", "scheme": "FP8_BLOCK",  # on down_proj, the one with 128 inputs
                            "ignore": ["lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}),
    ("compressed-tensors", {"method": "rtn", "scheme": "NVFP4"}),
    ("compressed-tensors", {"method": "rtn", "scheme": "MXFP4"}),
])
def test_every_format_adopts_its_block_files_by_default(tiny_models, texts, tmp_path, fmt, quant):
    """The default export writes no block twice, in every format and scheme: each block's state
    file is laid out as its planned shard (else it would silently be written again)."""
    out = tmp_path / "out"
    cfg = run_config(tiny_models["llama"], texts, out, export={"format": fmt}, calib={"n_samples": 4, "seq_len": 16},
                     eval={"enabled": False})
    cfg["quant"] = quant
    report = quantize(build_config(cfg), show_progress=False)
    n = len(report["blocks"])
    assert n >= 2 and report["export"]["adopted_shards"] == n and report["export"]["shards"] == n + 1, report["export"]
    assert verify(out / "model") == []


def test_moe_blocks_are_adopted_too(moe_models, texts, tmp_path):
    """DeepSeek-V3's blocks (MLA attention, routed and shared experts, a dense first block)
    become their shards like dense ones."""
    out = tmp_path / "out"
    cfg = run_config(moe_models["deepseek_v3"], texts, out, calib={"n_samples": 4, "seq_len": 16},
                     eval={"enabled": False}, quant={"method": "rtn", "bits": 4, "group_size": 16})
    report = quantize(build_config(cfg), show_progress=False)
    assert report["export"]["adopted_shards"] == len(report["blocks"]) == 3 and report["export"]["shards"] == 4
    assert verify(out / "model") == []
