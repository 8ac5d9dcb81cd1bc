"""The exported checkpoint's sha256 on SmolLM2 for RTN, GPTQ (local) and GPTQ on 2 Ray workers.

A refactor must not move a byte: run this before and after and compare the printed digests
(`--json FILE` keeps them). The runs are short (16 windows of 256 tokens, no evaluation) since
only the bytes matter; the export format is compressed-tensors, the packed path users serve.

    python benchmarks/export_digests.py [--json digests.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from _common import run_quantize


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 over the checkpoint's safetensors files and index, by name, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "model.safetensors.index.json"]:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the digests here")
    ap.add_argument("--workdir", type=Path, help="run directories (default: a temp dir)")
    args = ap.parse_args()
    from shardquant.tools.assets import shakespeare_split, smollm2_dir

    calib, _ = shakespeare_split()
    base = {
        "model": {"path": str(smollm2_dir())},
        "calib": {"path": str(calib), "n_samples": 16, "seq_len": 256, "batch_size": 8, "seed": 0},
        "quant": {"method": "gptq", "bits": 4, "group_size": 64},
        "eval": {"enabled": False},
        "export": {"format": "compressed-tensors", "shard_size": "200MB"},
    }
    runs = {
        "rtn-local": {"quant": {"method": "rtn"}},
        "gptq-local": {},
        "gptq-ray2": {"cluster": {"backend": "ray", "workers": 2}},
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shardquant-digests-"))
    out = {}
    for name, extra in runs.items():
        cfg = json.loads(json.dumps(base))
        for section, values in extra.items():
            cfg.setdefault(section, {}).update(values)
        cfg["output"] = str(work / name)
        run_quantize(cfg, work / f"{name}.cfg")
        out[name] = checkpoint_digest(work / name / "model")
        print(f"{name:<12} {out[name]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
