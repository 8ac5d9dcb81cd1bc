"""The checkpoint manifest and `shardquant verify`: an intact export passes, and a truncated,
an altered and a deleted shard are each named; no manifest or an unsafe one is bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_config

from shardquant.cli import main
from shardquant.config import build_config
from shardquant.export.manifest import MANIFEST, verify, write_manifest
from shardquant.pipeline import quantize


@pytest.fixture(scope="module")
def exported(tiny_models, texts, tmp_path_factory) -> Path:
    """A real run's directory: the llama fixture exported as several 100 KB shards."""
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = run_config(tiny_models["llama"], texts, out, quant={"method": "rtn"}, eval={"enabled": False},
                     calib={"n_samples": 4, "seq_len": 32}, export={"shard_size": "100KB"})
    quantize(build_config(cfg), show_progress=False)
    return out


@pytest.fixture
def run_dir(exported, tmp_path) -> Path:
    """A private copy of the run directory, free to damage."""
    return Path(shutil.copytree(exported, tmp_path / "out"))


def cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out.splitlines(), [ln for ln in cap.err.splitlines() if ln.strip()]


def test_export_writes_a_manifest_of_every_file(exported):
    model = exported / "model"
    manifest = json.loads((model / MANIFEST).read_text())
    on_disk = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [e["path"] for e in manifest["files"]] == on_disk
    assert len([p for p in on_disk if p.endswith(".safetensors")]) >= 3
    for e in manifest["files"]:
        data = (model / e["path"]).read_bytes()
        assert e["size"] == len(data)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["total_bytes"] == sum(e["size"] for e in manifest["files"])
    assert not list(model.glob(".*.tmp"))
    assert verify(model) == []


def test_write_manifest_replaces_atomically(run_dir):
    model = run_dir / "model"
    (model / "notes.txt").write_text("added after export")
    path = write_manifest(model)
    assert path == model / MANIFEST
    assert "notes.txt" in [e["path"] for e in json.loads(path.read_text())["files"]]
    assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == []
    assert verify(model) == []


@pytest.mark.parametrize("which", ["run", "model"])
def test_verify_ok(exported, capsys, which):
    target = exported if which == "run" else exported / "model"
    entries = json.loads((exported / "model" / MANIFEST).read_text())["files"]
    code, out, err = cli(capsys, "verify", str(target))
    assert (code, err) == (0, [])
    assert out == [f"OK: {exported / 'model'}: {len(entries)} files, {sum(e['size'] for e in entries)} bytes match {MANIFEST}"]


def test_verify_names_each_problem(run_dir, capsys):
    model = run_dir / "model"
    shards = sorted(model.glob("model-*.safetensors"))
    truncated, flipped, deleted = shards[0], shards[1], shards[2]
    full, deleted_size = truncated.stat().st_size, deleted.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    (model / "stray.bin").write_bytes(b"not exported")

    code, out, err = cli(capsys, "verify", str(run_dir))
    assert code == 2
    assert sorted(out) == sorted([
        f"FAILED: truncated: {truncated.name}: {full - 100} bytes, manifest says {full}",
        f"FAILED: altered: {flipped.name}: sha256 differs from the manifest (same size)",
        f"FAILED: missing: {deleted.name}: listed with {deleted_size} bytes, not on disk",
        "warning: extra: stray.bin: not in the manifest",
    ])
    assert len(out) == 4
    n = len(json.loads((model / MANIFEST).read_text())["files"])
    assert err == [
        f"shardquant: error: checkpoint '{model}' failed verification: 3 of {n} files altered/missing/truncated "
        "(listed above)"
    ]
    kinds = {p.kind: p.path for p in verify(model)}
    assert kinds == {"truncated": truncated.name, "altered": flipped.name, "missing": deleted.name, "extra": "stray.bin"}


def test_verify_extra_file_only_warns(run_dir, capsys):
    (run_dir / "model" / "README.md").write_text("hand-written notes")
    code, out, err = cli(capsys, "verify", str(run_dir / "model"))
    assert (code, err) == (0, [])
    assert out[0] == "warning: extra: README.md: not in the manifest"
    assert out[1].startswith("OK: ")


def test_verify_without_manifest(run_dir, tmp_path, capsys):
    (run_dir / "model" / MANIFEST).unlink()
    code, out, err = cli(capsys, "verify", str(run_dir))
    assert code == 2
    assert err == [
        f"shardquant: error: '{run_dir / 'model'}' has no {MANIFEST} "
        "(not a shardquant checkpoint, or exported before manifests)"
    ]
    code, out, err = cli(capsys, "verify", str(tmp_path / "nowhere"))
    assert (code, err) == (2, [f"shardquant: error: verify: '{tmp_path / 'nowhere'}' is not a directory"])


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../x", "", None, 3])
def test_verify_refuses_an_unsafe_manifest(run_dir, capsys, bad):
    """A manifest cannot make verify read outside the checkpoint directory."""
    path = run_dir / "model" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"].append({"path": bad, "size": 1, "sha256": "0" * 64})
    path.write_text(json.dumps(manifest))
    code, out, err = cli(capsys, "verify", str(run_dir))
    assert code == 2 and out == []
    assert len(err) == 1 and "has a malformed or unsafe entry" in err[0], err


def test_verify_as_a_process(run_dir):
    """The installed entry point: exit 2 on a damaged checkpoint, without importing torch."""
    shard = sorted((run_dir / "model").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    code = (
        "import sys; from shardquant.cli import main; rc = main(['verify', sys.argv[1]]); "
        "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.startswith(f"FAILED: truncated: {shard.name}: ")
    assert proc.stderr.splitlines() == [
        f"shardquant: error: checkpoint '{run_dir / 'model'}' failed verification: 1 of "
        f"{len(json.loads((run_dir / 'model' / MANIFEST).read_text())['files'])} files truncated (listed above)",
        "False",
    ]
