"""Peak RSS must not grow with depth: random Llama models of L and 2L blocks (each >= 50 MB).

Usage: python benchmarks/memory_depth.py [--layers L]
Each model is quantized (GPTQ 4-bit g128) in its own process; prints the peak-RSS ratio
(target <= 1.10).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _common import ROOT, run_quantize


def build(path: Path, layers: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="200MB")
    build_tokenizer(path, vocab_size=512)
    del model


def depth_config(model: Path, text: Path, output: Path) -> dict:
    """The run both depth benchmarks use: GPTQ w4 g128, 16 x 256 calibration tokens, no eval."""
    return {
        "model": {"path": str(model)},
        "calib": {"path": str(text), "n_samples": 16, "seq_len": 256, "batch_size": 8},
        "quant": {"method": "gptq", "bits": 4, "group_size": 128},
        "output": str(output),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text

    work = Path(tempfile.mkdtemp(prefix="sq-mem-"))
    text = work / "calib.txt"
    text.write_text(make_text(20000, 3))
    rows = []
    for layers in (args.layers, 2 * args.layers):
        mdir = work / f"llama-{layers}"
        build(mdir, layers)
        block_mb = sum(f.stat().st_size for f in mdir.glob("*.safetensors")) / 2**20
        r = run_quantize(depth_config(mdir, text, work / f"out-{layers}"), work / f"cfg-{layers}")
        rows.append((layers, block_mb, r["memory"]["peak_rss_bytes"] / 2**20))
    print("| blocks | checkpoint MiB | peak RSS MiB |\n| --- | --- | --- |")
    for layers, mb, rss in rows:
        print(f"| {layers} | {mb:.0f} | {rss:.0f} |")
    print(f"peak-RSS ratio 2L/L: {rows[1][2] / rows[0][2]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
