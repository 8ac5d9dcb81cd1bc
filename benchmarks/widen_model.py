"""SmolLM2-135M widened so every linear's sizes are multiples of 128, computing the same function.

    python benchmarks/widen_model.py [--out DIR]

FP8_BLOCK's 128 × 128 weight blocks and per-128-column input groups need 128-multiple sizes,
and vLLM needs them for merged projections' outputs too. SmolLM2's are not (hidden 576, 9 heads
over 3 kv heads of 64), and this machine holds no larger model. The widened copy pads with
zeros, which changes no output:

- hidden 576 → 768: the embedding (tied lm_head), every linear writing the residual (o_proj,
  down_proj) and reading it get zero rows or columns, so the residual's extra channels stay 0.
  RMSNorm averages over 768 channels instead of 576; its weights are multiplied by
  sqrt(576 / 768) and its eps by 576 / 768, which gives the same normalized values exactly in
  real arithmetic.
- 9 heads over 3 kv heads → 12 over 4 (still 3 per kv head): heads 9-11 and kv head 3 are
  zero, so their scores are uniform over zero values and add nothing through o_proj.

Sizes then: q 768 × 768, k/v 256 × 768, o 768 × 768, gate/up 1536 × 768, down 768 × 1536
(transformers wants hidden = heads · head_dim, hence 768 rather than 640). The
script checks the widened model's logits against the original's with transformers before it
writes the copy (atomically: temp name, then rename). Weights are read with safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shardquant.tools.assets import smollm2_dir

HIDDEN, HEADS, KV_HEADS = 768, 12, 4  # transformers wants hidden = heads · head_dim


def pad(t: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    """`t` in the leading corner of a tensor of `shape` filled with `fill`."""
    out = torch.full(shape, fill, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def widen(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """The widened state dict of a Llama state dict with config `cfg` (see the module docstring)."""
    hd, inter = cfg["head_dim"], cfg["intermediate_size"]
    norm = math.sqrt(cfg["hidden_size"] / HIDDEN)
    shapes = {
        "q_proj": (HEADS * hd, HIDDEN), "k_proj": (KV_HEADS * hd, HIDDEN), "v_proj": (KV_HEADS * hd, HIDDEN),
        "o_proj": (HIDDEN, HEADS * hd), "gate_proj": (inter, HIDDEN), "up_proj": (inter, HIDDEN),
        "down_proj": (HIDDEN, inter),
    }
    out = {}
    for name, t in tensors.items():
        leaf = name.split(".")[-2]
        if leaf in shapes:
            out[name] = pad(t, shapes[leaf])
        elif name.endswith("norm.weight"):
            out[name] = pad(t * norm, (HIDDEN,), 1.0)
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            out[name] = pad(t, (t.shape[0], HIDDEN))
        else:
            raise SystemExit(f"{name}: not a tensor this script knows how to widen")
    return out


def check(src: Path, dst: Path) -> float:
    """Largest |logit difference| of the two models on a fixed text (transformers, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok("When shall we three meet again, in thunder, lightning, or in rain? " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()(ids).logits
    return float((a - b).abs().max() / a.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default: next to the cached SmolLM2, smollm2-135m-wide128")
    args = ap.parse_args()
    src = smollm2_dir()
    out = Path(args.out) if args.out else src.parent / "smollm2-135m-wide128"
    cfg = json.loads((src / "config.json").read_text())
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    wide = widen(tensors, cfg)
    new = {**cfg, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "rms_norm_eps": cfg["rms_norm_eps"] * cfg["hidden_size"] / HIDDEN}
    tmp = Path(tempfile.mkdtemp(prefix=".wide-", dir=out.parent))
    try:
        save_file(wide, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(new, indent=2))
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(f, tmp / f.name)
        err = check(src, tmp)
        print(f"largest logit difference, relative to the largest logit: {err:.2e}")
        if err > 1e-4:
            raise SystemExit("the widened model does not compute the original's function")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(out)


if __name__ == "__main__":
    main()
