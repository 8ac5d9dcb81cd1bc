"""`shardquant plan` against measurement on a mixture-of-experts model (issue 18), and what
observing the experts in passes (`quant.moe_experts_per_pass`) costs and saves.

Usage: python benchmarks/plan_accuracy_moe.py [--hidden 1024] [--experts 64] [--layers 1] [--windows 8]
                                              [--seq-len 128] [--per-pass 0 16]
                                              [--backends local ray] [--out DIR] [--replan]

A random Qwen3-MoE model (fp32 safetensors, vocab 512, `--layers` sparse blocks, `--experts` experts
of hidden/4, top 8, heads hidden/128 of 128, 4 KV heads) is quantized by GPTQ (4-bit, group
128, every expert calibrated on every token; 8 × 128 calibration tokens, batch 4, no eval)
locally and on 2 private Ray workers, each run in a fresh process, once with every expert in
one pass (`--per-pass 0`: auto, no budget) and once per listed number of experts a pass.
Prints, per run and process, the measured VmHWM against the plan (`shardquant plan CONFIG
--json --device cpu`: a worker against its rank's `worker_peaks`, the driver against
`driver`, a local process against `worker_peaks[0]`), the seconds spent observing (forward +
statistics) and solving, and the plan's terms. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, run_quantize
from plan_accuracy import GIB, TERMS, VOCAB, env, idle_process, idle_ray, plan


def build(path: Path, hidden: int, experts: int, layers: int) -> int:
    """Save a random Qwen3-MoE model at `path` (unless there); return one block's fp32 bytes."""
    if (path / "config.json").is_file():
        return json.loads((path / "block_bytes.json").read_text())
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer
    from moe_fixtures import randomize

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, moe_intermediate_size=hidden // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=4, head_dim=128,
        num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=1024,
    )
    torch.manual_seed(hidden)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model)
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    model.save_pretrained(path, max_shard_size="500MB")
    build_tokenizer(path, vocab_size=VOCAB)
    (path / "block_bytes.json").write_text(str(block))
    return block


def run_config(model: Path, text: Path, backend: str, per_pass: int, output: Path, windows: int, seq_len: int
               ) -> dict:
    cluster = {"backend": "ray", "workers": 2, "cpus_per_worker": 1} if backend == "ray" else {"backend": "local"}
    quant = {"method": "gptq", "bits": 4, "group_size": 128}
    if per_pass:
        quant["moe_experts_per_pass"] = per_pass
    return {
        "model": {"path": str(model), "device": "cpu"},
        "calib": {"path": str(text), "n_samples": windows, "seq_len": seq_len, "batch_size": 4},
        "quant": quant,
        "eval": {"enabled": False},
        "cluster": cluster,
        "output": str(output),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1, help="sparse blocks")
    ap.add_argument("--per-pass", type=int, nargs="+", default=[0, 16], help="0: every expert in one pass")
    ap.add_argument("--backends", nargs="+", default=["local", "ray"])
    ap.add_argument("--out", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--replan", action="store_true", help="run nothing: re-plan the runs already in --out")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text

    work = Path(args.out or tempfile.mkdtemp(prefix="sq-plan-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    if not text.is_file():
        text.write_text(make_text(20000, 1))
    idle = idle_process()
    _, ray_actor, ray_driver = idle_ray()
    model = work / f"qwen3moe-{args.hidden}-{args.experts}-{args.layers}"
    block = build(model, args.hidden, args.experts, args.layers)
    print(f"work dir {work}\nmodel {model.name}: block {block / 2**20:.0f} MiB fp32\n", flush=True)

    runs = []
    for per_pass in args.per_pass:
        for backend in args.backends:
            rundir = work / "runs" / f"{backend}-{per_pass or 'all'}"
            cfg = run_config(model, text, backend, per_pass, rundir / "out", args.windows, args.seq_len)
            rundir.mkdir(parents=True, exist_ok=True)
            (rundir / "run.yaml").write_text(yaml.safe_dump(cfg))
            runs.append((backend, per_pass, rundir, cfg))
    if not args.replan:
        for backend, per_pass, rundir, cfg in runs:
            shutil.rmtree(rundir / "out", ignore_errors=True)
            t0 = time.perf_counter()
            rep = run_quantize(cfg, rundir, env=env())
            print(f"  {backend} per_pass={per_pass or 'all'}: {time.perf_counter() - t0:.0f} s, "
                  f"peak {rep['memory']['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)

    rows, term_rows = [], []
    for backend, per_pass, rundir, _ in runs:
        report = rundir / "out" / "report.json"
        if not report.is_file():
            continue
        rep = json.loads(report.read_text())
        planned = plan(rundir / "run.yaml")
        term_rows.append((backend, per_pass, planned["memory"]))
        ranks = planned["worker_peaks"]
        blocks = rep["blocks"]
        observe = sum(b.get("forward_s", 0) + b.get("stats_s", 0) for b in blocks)
        solve = sum(b.get("solve_s", 0) for b in blocks)
        passes = blocks[0]["experts"]["passes"]
        timing = (passes, observe, solve)
        if backend == "ray":
            procs = [("driver", rep["memory"]["driver_peak_rss_bytes"], planned["driver"], ray_driver)]
            procs += [(w, v, ranks[int(w[1:])], ray_actor) for w, v in rep["cluster"]["peak_rss_bytes"].items()]
        else:
            procs = [("process", rep["memory"]["peak_rss_bytes"], ranks[0], idle)]
        rows += [(backend, per_pass or "all", *p, timing) for p in procs]

    print("\n| backend | experts per pass | process | measured GiB | planned GiB | ratio | expert passes a block "
          "| observe s | solve s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for backend, per_pass, proc, measured, pl, _idle, (passes, observe, solve) in rows:
        print(f"| {backend} | {per_pass} | {proc} | {measured / GIB:.2f} | {pl / GIB:.2f} | {measured / pl:.2f} "
              f"| {passes} | {observe:.0f} | {solve:.0f} |")
    print("\nplan's memory terms (rank 0), GiB:\n")
    print("| backend | experts per pass | " + " | ".join(TERMS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in TERMS) + " |")
    for backend, per_pass, mem in term_rows:
        print(f"| {backend} | {per_pass or 'all'} | " + " | ".join(f"{mem.get(t, 0) / GIB:.3f}" for t in TERMS) + " |")
    (work / "results.json").write_text(json.dumps({"rows": [list(r) for r in rows]}, indent=1, default=str))


if __name__ == "__main__":
    main()
