"""`shardquant inspect DIR`: format, scheme, size and linears of each export format, checked
against the files themselves (sizes from the filesystem, tensors read with safetensors), and
one clear line with exit 2 for a directory it cannot read."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import read_checkpoint, run_config

from shardquant.cli import main
from shardquant.config import build_config
from shardquant.pipeline import quantize

QUANT = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "ignore": ["lm_head", "o_proj"]}
CALIB = {"n_samples": 4, "seq_len": 32}
FORMATS = ("compressed-tensors", "awq", "fake")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tiny_models, texts, tmp_path_factory):
    """Run dirs of the same RTN run exported in each format, plus a GPTQ (symmetric) one."""
    out = {}
    for fmt in (*FORMATS, "gptq"):
        quant = QUANT | ({"symmetric": True, "ignore": ["lm_head"]} if fmt == "gptq" else {})
        run = tmp_path_factory.mktemp(fmt)
        cfg = build_config(run_config(tiny_models["llama"], texts, run, quant=quant, calib=CALIB,
                                      export={"format": fmt, "shard_size": "100KB"}, eval={"enabled": False}))
        quantize(cfg, show_progress=False)
        out[fmt] = run
    return out


def inspect_json(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", [*FORMATS, "gptq"])
def test_reports_what_is_on_disk(fmt, exports, tiny_models, capsys):
    model = exports[fmt] / "model"
    got = inspect_json(exports[fmt], capsys)  # a run directory resolves to its model/
    assert got["path"] == str(model)
    assert got["format"] == fmt
    sym = fmt == "gptq"
    assert got["scheme"] == {"bits": 4, "group_size": 32, "symmetric": False if fmt == "awq" else sym,
                             "act_order": False}
    files = [p for p in model.iterdir() if p.is_file()]
    shards = sorted(model.glob("*.safetensors"))
    assert got["bytes_on_disk"] == sum(p.stat().st_size for p in files)
    assert got["safetensors_bytes"] == sum(p.stat().st_size for p in shards)
    assert got["shards"] == len(shards) > 1
    tensors = read_checkpoint(model)
    assert got["tensors"] == len(tensors)

    # Shapes from the source model; bytes from the tensors themselves.
    src = read_checkpoint(tiny_models["llama"])
    kinds = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"] + (["o_proj"] if sym else [])
    names = sorted(f"model.layers.{i}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}" for i in range(3) for k in kinds)
    if fmt == "fake":
        names = sorted(names + [f"model.layers.{i}.self_attn.o_proj" for i in range(3)])
    linears = {x["name"]: x for x in got["linears"]}
    assert sorted(linears) == names
    for name, lin in linears.items():
        assert tuple(lin["shape"]) == tuple(src[f"{name}.weight"].shape)
        own = [t for k, t in tensors.items() if k.rsplit(".", 1)[0] == name and not k.endswith(".bias")]
        assert lin["bytes"] == sum(t.numel() * t.element_size() for t in own), name
        assert lin["bits"] == (32 if fmt == "fake" else 4)
        assert lin["group_size"] == 32
    not_quantized = [] if fmt == "fake" else (["lm_head"] if sym else [
        f"model.layers.{i}.self_attn.o_proj" for i in range(3)] + ["lm_head"])
    assert got["not_quantized"] == not_quantized
    types = {t["name"]: t for t in got["layer_types"]}
    assert types["model.layers.*.mlp.down_proj"]["count"] == 3
    assert sum(t["bytes"] for t in types.values()) == sum(x["bytes"] for x in linears.values())


def test_text_output_and_layers(exports, capsys):
    assert main(["inspect", str(exports["awq"] / "model")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^format: +awq$", text, re.M)
    assert re.search(r"^scheme: +4-bit, group 32, asymmetric, no act-order$", text, re.M)
    assert re.search(r"^model\.layers\.\*\.mlp\.down_proj +3 +64 x 128 +4 +32 +\d+$", text, re.M)
    assert main(["inspect", str(exports["awq"]), "--layers"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^model\.layers\.2\.mlp\.up_proj +128 x 64 +4 +32 +\d+$", text, re.M)


def test_fake_without_report_is_recognized_from_its_grid(exports, tmp_path, capsys):
    """A float checkpoint copied away from its report: the weights still sit on a 4-bit grid."""
    shutil.copytree(exports["fake"] / "model", tmp_path / "copy")
    got = inspect_json(tmp_path / "copy", capsys)
    assert (got["format"], got["scheme"]["bits"], got["scheme"]["group_size"]) == ("fake", 4, 32)


def test_source_model_is_unquantized(tiny_models, capsys):
    got = inspect_json(tiny_models["qwen2"], capsys)
    assert got["format"] == "unquantized" and got["scheme"]["bits"] is None
    assert len(got["linears"]) == 21 and all(x["bits"] == 32 for x in got["linears"])


def _truncate(model):
    shard = sorted(model.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return shard.name


def _bad_index(model):
    (model / "model.safetensors.index.json").write_text("{not json")
    return "model.safetensors.index.json"


def _no_config(model):
    (model / "config.json").unlink()
    return "no config.json"


def _missing_shard(model):
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.unlink()
    return shard.name


@pytest.mark.parametrize("damage", [_truncate, _bad_index, _no_config, _missing_shard])
def test_unreadable_checkpoint_exits_2_with_one_line(damage, exports, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(exports["compressed-tensors"] / "model", model)
    expected = damage(model)
    assert main(["inspect", str(model)]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("shardquant: error: inspect: "), lines
    assert expected in lines[0]
    assert captured.out == ""


def test_missing_directory_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"shardquant: error: inspect: '{tmp_path / 'nope'}' is not a directory"


def test_grid_estimate_needs_evidence():
    """Random floats are not mistaken for a grid; a 3-bit grid is found at its group size."""
    from safetensors.torch import save_file

    from shardquant.export.inspection import grid_scheme
    from shardquant.model.checkpoint import CheckpointIndex

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=gen)
    codes = torch.randint(0, 8, (16, 128), generator=gen).float()
    scales = torch.rand(16, 4, generator=gen).repeat_interleave(32, dim=1) + 0.1
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        save_file({"a.0.w.weight": w, "a.0.q.weight": (codes - 4) * scales}, str(Path(d) / "m.safetensors"))
        index = CheckpointIndex(d)
        assert grid_scheme(index, "a.0.w.weight") is None
        got = grid_scheme(index, "a.0.q.weight")
        assert (got.bits, got.group_size) == (3, 32)
