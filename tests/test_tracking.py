"""W&B tracking for real, offline: the run's own .wandb file is read back and checked."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import yaml
from conftest import run_config

from shardquant.config import build_config
from shardquant.pipeline import quantize

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic, version
RECORD = struct.Struct("<IHB")  # crc32c, length, type (1 full, 2 first, 3 middle, 4 last)


def read_wandb_records(path):
    """Decode a .wandb file (a LevelDB-style log of protobuf Records) with wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = HEADER.unpack_from(data, 0)
    assert ident == b":W&B"
    pos, pending, records = HEADER.size, b"", []
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = RECORD.unpack_from(data, pos)
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + RECORD.size : pos + RECORD.size + length]
        pos += RECORD.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network call would fail fast
    return tmp_path


def test_offline_run_matches_report(tiny_models, texts, tmp_path, wandb_env):
    out = tmp_path / "out"
    cfg = build_config(run_config(tiny_models["llama"], texts, out, tracking={"wandb": {"mode": "offline", "project": "sq-test"}}))
    report = quantize(cfg, show_progress=False)
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = read_wandb_records(files[0])
    history, summary, config, artifacts = [], {}, {}, []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
        elif kind in ("config", "run"):
            updates = rec.config.update if kind == "config" else rec.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "artifact":
            artifacts.append(sorted(e.path for e in rec.artifact.manifest.contents))
    rows = [h for h in history if "block/index" in h]
    assert [r["block/index"] for r in rows] == [b["index"] for b in report["blocks"]]
    for row, block in zip(rows, report["blocks"], strict=True):
        assert row["block/seconds"] == pytest.approx(block["seconds"])
        assert row["block/worker"] == block["worker"]
        assert row["block/activation_bytes"] == block["activation_bytes"] > 0
        for layer, loss in block["loss"].items():
            assert row[f"loss/{layer}"] == pytest.approx(loss)
    assert summary["ppl/fp"] == pytest.approx(report["ppl"]["fp"])
    assert summary["ppl/quantized"] == pytest.approx(report["ppl"]["quantized"])
    assert summary["timing/total_s"] == pytest.approx(report["timing"]["total_s"])
    assert summary["memory/peak_rss_bytes"] == report["memory"]["peak_rss_bytes"]
    assert summary["export/bytes"] == report["export"]["bytes"]
    quant = config["quant"]
    assert quant.get("value", quant) == report["config"]["quant"]
    assert ["loss.png", "report.json", "report.md", "time.png"] in artifacts


def test_report_md_has_plots(tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    quantize(build_config(run_config(tiny_models["qwen2"], texts, out)), show_progress=False)
    md = (out / "report.md").read_text()
    assert "![loss](loss.png)" in md and "![time](time.png)" in md
    for name in ("loss.png", "time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "wandb").exists()  # disabled: nothing written, nothing imported


@pytest.mark.timeout(180)  # wandb.init gives up after its 25 s init_timeout at the latest
def test_online_without_network_fails_fast(tiny_models, texts, tmp_path, wandb_env):
    """No network for mode: online: one error line, before any block is calibrated."""
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, out, tracking={"wandb": {"mode": "online"}})))
    proc = subprocess.run([sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("shardquant: error: tracking.wandb.mode=online: cannot start a W&B run")
    assert not (out / "state").exists()  # stopped before its first block: no progress, no block
    assert not (out / "model").exists()
