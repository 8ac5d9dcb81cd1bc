"""On-disk size of a packed export vs. its theoretical size.

Builds a random Llama-shaped fp16 model of about 1 GB (hidden 1024, MLP 2816, GQA 16/4 heads,
vocab 32000, all linear input sizes multiples of 128), quantizes it with RTN 4-bit group 128
symmetric (RTN: no solve, so the run is quick), exports `compressed-tensors`, and compares the
safetensors bytes on disk (shards + index) with the theoretical size computed from the model's
shapes alone: 4 bits per quantized weight, one fp16 scale per 128 weights, every other tensor
(embeddings, lm_head, norms) at 2 bytes per value. Exits 1 when the ratio is off by more than
2%.

    python benchmarks/export_size.py [--layers 39] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from _common import run_quantize  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, GROUP, BITS = 1024, 2816, 16, 4, 32000, 128, 4


def linear_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every block linear, by full name."""
    kv = HIDDEN // HEADS * KV_HEADS
    per = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
    }
    return {f"model.layers.{i}.{n}": s for i in range(layers) for n, s in per.items()}


def other_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor that stays in fp16: embeddings, lm_head, norms."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
                                       "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def theoretical_bytes(layers: int) -> int:
    """4-bit codes + one fp16 scale per group for the linears; fp16 for everything else."""
    packed = sum(o * i * BITS // 8 + o * (i // GROUP) * 2 for o, i in linear_shapes(layers).values())
    return packed + sum(2 * numel(s) for s in other_shapes(layers).values())


def build_model(directory: Path, layers: int, shard_bytes: int = 500 * 10**6) -> int:
    """Write the random fp16 model (config, tokenizer, sharded safetensors); return its bytes."""
    from conftest import build_tokenizer
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="float16",
    ).save_pretrained(directory)
    build_tokenizer(directory)
    gen = torch.Generator().manual_seed(0)
    shapes = {**{f"{n}.weight": s for n, s in linear_shapes(layers).items()}, **other_shapes(layers)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).half()
        if size and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.nbytes for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=39, help="decoder blocks (39: about 1.0 GB in fp16)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model and the export")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sq-export-size-"))
    try:
        from conftest import make_text

        t0 = time.perf_counter()
        src_bytes = build_model(work / "src", args.layers)
        (work / "calib.txt").write_text(make_text(4000, 1))
        build_s = time.perf_counter() - t0
        cfg = {
            "model": {"path": str(work / "src"), "dtype": "float16"},
            "calib": {"path": str(work / "calib.txt"), "n_samples": 2, "seq_len": 32, "batch_size": 2},
            "quant": {"method": "rtn", "bits": BITS, "group_size": GROUP, "symmetric": True},
            "eval": {"enabled": False},
            "export": {"format": "compressed-tensors", "shard_size": "500MB"},
            "output": str(work / "run"),
        }
        t0 = time.perf_counter()
        report = run_quantize(cfg, work / "cfg")
        run_s = time.perf_counter() - t0
        model = Path(report["export"]["path"])
        shards = sorted(model.glob("*.safetensors"))
        on_disk = sum(p.stat().st_size for p in shards) + (model / "model.safetensors.index.json").stat().st_size
        whole_dir = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
        theory = theoretical_bytes(args.layers)
        ratio = on_disk / theory
        print(f"source: {args.layers} blocks, {src_bytes / 1e9:.3f} GB fp16 (built in {build_s:.0f} s)")
        print(f"export: compressed-tensors RTN {BITS}-bit group {GROUP} sym, {len(shards)} shards, "
              f"run {run_s:.0f} s, peak RSS {report['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
        print(f"on disk (shards + index): {on_disk} bytes; whole model dir {whole_dir} bytes")
        print(f"theoretical:              {theory} bytes (4 bits/weight + fp16 scale per {GROUP}, rest fp16)")
        print(f"on disk / theoretical:    {ratio:.5f}")
        print(f"export / fp16 source:     {on_disk / src_bytes:.4f}")
        ok = abs(ratio - 1) <= 0.02
        print("OK: within 2%" if ok else "FAIL: more than 2% off")
        return 0 if ok else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
