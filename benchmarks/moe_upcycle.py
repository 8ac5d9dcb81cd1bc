"""A mixture-of-experts model that behaves like a real one, and RTN vs GPTQ on it.

Sparse upcycling of SmolLM2-135M (the foundation's real model): every MLP is copied into E
experts of a Mixtral (gate -> w1, up -> w3, down -> w2), each copy with Gaussian noise of
`--noise` times that matrix's standard deviation, and a random router (N(0, 1/hidden)); top-2
routing, attention, norms and embeddings as in SmolLM2. Since the experts are near copies
and Mixtral's top-k weights sum to 1, the model's perplexity stays near SmolLM2's.

Runs (w4g64 symmetric): RTN; GPTQ with all-experts statistics (the default); GPTQ with
routed-only statistics (`quant.moe_calibrate_all_experts: false`). Calibration and
evaluation follow benchmarks/real_model.py's protocol (Shakespeare plays vs Macbeth), with
fewer windows by default. Usage:

    python benchmarks/moe_upcycle.py [--experts 4] [--noise 0.05] [--calib 16] [--eval 8] [--seq-len 256]
                                     [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import run_many, smollm2_protocol


def upcycle(src: Path, dest: Path, experts: int, noise: float, seed: int = 0) -> Path:
    """Write the upcycled Mixtral checkpoint (safetensors via save_pretrained: per-expert names)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=2, sliding_window=None,
    )
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)

    def noisy(w: torch.Tensor) -> torch.Tensor:
        return w + noise * w.std() * torch.randn(w.shape, generator=g)

    with torch.no_grad():
        state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
        missing, _ = moe.load_state_dict(state, strict=False)
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            ex = layer.mlp.experts
            for e in range(experts):
                ex.gate_up_proj[e] = torch.cat([noisy(mlp.gate_proj.weight), noisy(mlp.up_proj.weight)])
                ex.down_proj[e] = noisy(mlp.down_proj.weight)
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=g) * c.hidden_size ** -0.5)
        left = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
        assert not left, left
    moe.save_pretrained(dest)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dest / f)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-moe-"))
    base = smollm2_protocol(calib_n=args.calib, eval_n=args.eval, seq_len=args.seq_len)
    model = out / f"smollm2-upcycled-e{args.experts}"
    if not (model / "config.json").is_file():
        upcycle(Path(base["model"]["path"]), model, args.experts, args.noise)
    runs, names = [], []
    for name, quant in [
        ("rtn", {"method": "rtn"}),
        ("gptq-all-experts", {"method": "gptq"}),
        ("gptq-routed", {"method": "gptq", "moe_calibrate_all_experts": False}),
    ]:
        cfg = json.loads(json.dumps(base))
        cfg["model"]["path"] = str(model)
        cfg["quant"] = {"bits": 4, "group_size": 64, "symmetric": True, **quant}
        cfg["export"]["format"] = "fake"
        cfg["eval"]["fp"] = not runs
        cfg["output"] = str(out / name)
        runs.append((cfg, out / f"cfg-{name}"))
        names.append(name)
    reports = {}
    for i, rep in run_many(runs):
        reports[names[i]] = rep
        print(names[i], json.dumps(rep["ppl"]), f"{rep['timing']['calibrate_s']:.0f}s", flush=True)
    fp = reports["rtn"]["ppl"]["fp"]
    print(f"\n| run | ppl | / fp |\n| --- | --- | --- |\n| fp | {fp:.3f} | 1.000 |")
    for n in names:
        q = reports[n]["ppl"]["quantized"]
        print(f"| {n} | {q:.3f} | {q / fp:.4f} |")
    tokens = [b["experts"]["tokens"] for b in reports["gptq-all-experts"]["blocks"]]
    low = min(min(t) for t in tokens)
    fallbacks = {n: sum(len(b["experts"]["rtn_fallback"]) for b in r["blocks"]) for n, r in reports.items()
                 if n != "rtn"}
    print(f"\nfewest tokens routed to an expert in any block: {low}; RTN fallbacks: {fallbacks}")


if __name__ == "__main__":
    main()
