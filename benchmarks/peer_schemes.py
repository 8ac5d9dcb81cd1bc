"""Weight-activation presets against llm-compressor's on SmolLM2-135M (issue 19), side by side.

Rows (each peer's own preset, at its defaults, against ours with the same scheme and method):

- ``FP8_DYNAMIC``: llm-compressor's ``QuantizationModifier`` (round to nearest) against our RTN;
- ``W8A8 SmoothQuant + GPTQ``: its ``SmoothQuantModifier(0.5)`` then ``GPTQModifier(W8A8)``
  against our ``quant.smoothquant: 0.5`` + GPTQ;
- ``NVFP4``: its ``QuantizationModifier(NVFP4)`` (round to nearest, the input global scales
  calibrated) against our RTN.
- ``fp8_dynamic_sized``: the first row again, ours with size-capped shards
  (``export.shard_size: 500MB``) instead of the default one shard per block (whose state
  files become the shards, so the final assembly writes only the tensors outside the blocks):
  the whole checkpoint is written again at the end.

Protocol: the calibration windows of benchmarks/peers.py (cut by shardquant's own reader and
handed to the peer as token ids); every run is its own process; calibration seconds are the
peer's ``oneshot`` call plus its ``save_pretrained`` (which compresses the weights as it writes)
against our ``timing.calibrate_s`` (which exports each block as it finishes; model load
excluded) plus the final assembly of the shards (``timing.export_s`` less the blocks' own),
with our in-loop evaluation off (``eval.enabled: false``). Both write
compressed-tensors checkpoints, and ONE evaluator reads them all: transformers +
compressed-tensors (the reader vLLM's format comes from), on the same ``--eval`` x ``--seq-len``
consecutive windows of Macbeth, on the library's quantized forward, which quantizes every
quantized linear's input as the checkpoint declares. FP4 checkpoints are evaluated in bfloat16
(compressed-tensors' FP4 reader decompresses into bfloat16 whatever the model's dtype), the others
in float32; the fp row is given in both.

    python benchmarks/peer_schemes.py [--calib 64] [--eval 32] [--seq-len 512]
        [--rows fp8_dynamic,w8a8_sq_gptq,nvfp4,w8a8_sq_range_gptq,fp8_dynamic_sized] [--peers llmcompressor,ours] [--work DIR] [--repeat N]

Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from peers import ensure_venv, measured, prepare_run, result_line

ROWS: dict[str, dict[str, Any]] = {  # row: our quant section, the peer's recipe, eval dtype
    "fp8_dynamic": {"ours": {"method": "rtn", "scheme": "FP8_DYNAMIC"}, "peer": "fp8_dynamic", "dtype": "float32"},
    "w8a8_sq_gptq": {"ours": {"method": "gptq", "scheme": "W8A8", "smoothquant": 0.5}, "peer": "w8a8_sq_gptq",
                     "dtype": "float32"},
    "nvfp4": {"ours": {"method": "rtn", "scheme": "NVFP4"}, "peer": "nvfp4", "dtype": "bfloat16"},
    # ours with llm-compressor's SmoothQuant statistic (`quant.smoothquant_stat: range`), same peer recipe
    "w8a8_sq_range_gptq": {"ours": {"method": "gptq", "scheme": "W8A8", "smoothquant": 0.5, "smoothquant_stat": "range"},
                           "peer": "w8a8_sq_gptq", "dtype": "float32"},
    # ours with size-capped shards, assembled again from the block state files at the end
    "fp8_dynamic_sized": {"ours": {"method": "rtn", "scheme": "FP8_DYNAMIC"}, "export": {"shard_size": "500MB"},
                          "peer": "fp8_dynamic", "dtype": "float32"},
}

LLMC_SCRIPT = '''
import json, sys, time
import torch
args = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

torch.manual_seed(0)
ids = json.load(open(args["calib"]))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
row = args["row"]
if row == "fp8_dynamic":
    recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
elif row == "w8a8_sq_gptq":
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
elif row == "nvfp4":
    recipe = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])
else:
    raise SystemExit(f"unknown row {row}")
t = time.perf_counter()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(ids[0]),
        num_calibration_samples=len(ids), shuffle_calibration_samples=False)
calib_s = time.perf_counter() - t
t = time.perf_counter()
model.save_pretrained(args["out"], save_compressed=True)  # compresses the weights as it writes
save_s = time.perf_counter() - t
AutoTokenizer.from_pretrained(args["model"]).save_pretrained(args["out"])
mods = recipe if isinstance(recipe, list) else [recipe]
print("RESULT " + json.dumps({"calib_s": calib_s, "save_s": save_s, "modifiers": [type(m).__name__ for m in mods]}))
'''


def run_peer(row: str, calib_ids: Path, model: Path, out: Path) -> dict[str, Any]:
    venv = ensure_venv("llmcompressor")
    out.mkdir(parents=True, exist_ok=True)
    script = out / "run_llmcompressor.py"
    script.write_text(LLMC_SCRIPT)
    args = {"model": str(model), "calib": str(calib_ids), "out": str(out / "model"), "row": ROWS[row]["peer"]}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    rc, wall, rss, stdout = measured([str(venv / "bin" / "python"), str(script), json.dumps(args)], env, out / "log.txt")
    if rc != 0:
        raise RuntimeError(f"llm-compressor failed ({rc}); log {out / 'log.txt'}:\n{(out / 'log.txt').read_text()[-3000:]}")
    res = result_line(stdout)
    # its oneshot calibrates and quantizes; save_pretrained compresses as it writes, which ours does
    # per block inside the calibration loop: the time compared is the two together
    return {"calib_s": res["calib_s"] + res["save_s"], "rss": rss, "model": out / "model", "info": res}


def run_ours(row: str, protocol: dict[str, Any], out: Path) -> dict[str, Any]:
    import yaml

    cfg = json.loads(json.dumps(protocol))
    cfg["quant"] = dict(ROWS[row]["ours"])
    cfg["eval"]["enabled"] = False  # the one evaluator below judges every checkpoint
    cfg["export"]["format"] = "compressed-tensors"
    cfg["export"].update(ROWS[row].get("export", {}))
    cfg["output"] = str(out / "run")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "shardquant", "quantize", str(out / "run.yaml"), "--quiet"]
    rc, _wall, rss, _ = measured(cmd, None, out / "log.txt")
    if rc != 0:
        raise RuntimeError(f"shardquant failed ({rc}):\n{(out / 'log.txt').read_text()[-3000:]}")
    report = json.loads((out / "run" / "report.json").read_text())
    timing = report["timing"]
    # the shards are assembled after the block loop, like the peer's save_pretrained: counted too
    assembly_s = timing["export_s"] - sum(b["export_s"] for b in report["blocks"])
    return {"calib_s": timing["calibrate_s"] + assembly_s, "rss": rss, "model": out / "run" / "model",
            "info": {"timing": {k: round(v, 2) for k, v in timing.items()}, "assembly_s": round(assembly_s, 2)}}


def perplexity(model_dir: Path, eval_path: Path, n: int, seq_len: int, dtype: str) -> float:
    """exp(mean next-token NLL) of transformers' load of ``model_dir`` (compressed-tensors'
    quantized forward for a quantized checkpoint) on the run's evaluation windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    wins = token_windows(tok, load_text(eval_path, key="eval.path"), n_samples=n, seq_len=seq_len, seed=0,
                         mode="sequential", key="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(w.unsqueeze(0)).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--peers", default="llmcompressor,ours")
    ap.add_argument("--work", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool per row; the median time is given")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if set(rows) - set(ROWS):
        raise SystemExit(f"--rows: expected some of {', '.join(ROWS)}, got {args.rows!r}")
    peers = [p for p in args.peers.split(",") if p]

    work, model, _calib_path, eval_path, protocol, calib_ids = prepare_run(args, "sq-peer-schemes-")
    print(f"work dir {work}; calibration {args.calib} x {args.seq_len}; eval {args.eval} x {args.seq_len}", flush=True)
    fp = {d: perplexity(model, eval_path, args.eval, args.seq_len, d) for d in sorted({ROWS[r]["dtype"] for r in rows})}
    print(f"fp perplexity {json.dumps(fp)}", flush=True)

    results: dict[str, dict[str, dict[str, Any]]] = {row: {} for row in rows}
    for rep in range(args.repeat):  # rows and tools alternate, so a slow spell of the machine hits all
        for row in rows:
            for p in peers:
                out = work / f"{row}-{p}" if rep == 0 else work / f"{row}-{p}-{rep}"
                print(f"[{row} {p}] running{f' (repeat {rep})' if rep else ''} ...", flush=True)
                r = run_ours(row, protocol, out) if p == "ours" else run_peer(row, calib_ids, model, out)
                if rep == 0:  # both tools' checkpoints are deterministic: the first one is evaluated
                    r["ppl"] = perplexity(r["model"], eval_path, args.eval, args.seq_len, ROWS[row]["dtype"])
                    results[row][p] = {**r, "times": []}
                got = results[row][p]
                got["times"].append(r["calib_s"])
                got["rss"] = max(got["rss"], r["rss"])
                print(f"[{row} {p}] calibration {r['calib_s']:.1f} s, peak RSS {r['rss'] / 2**30:.2f} GiB, "
                      f"ppl {got['ppl']:.3f}; {json.dumps(r['info'])}", flush=True)
    for by_tool in results.values():
        for r in by_tool.values():
            r["calib_s"] = statistics.median(r["times"])

    print(f"\nfp perplexity: {json.dumps(fp)}\n")
    print(f"calibration seconds: the median of {args.repeat} run(s) of each tool, the range in brackets\n")
    print("| preset | tool | eval dtype | calibration + compression s | peak RSS GiB | perplexity | / fp | ours / peer time | ours / peer ppl |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row, by_tool in results.items():
        ours, dtype = by_tool.get("ours"), ROWS[row]["dtype"]
        for p, r in by_tool.items():
            peer = ours is not None and p != "ours"
            tr = f"{ours['calib_s'] / r['calib_s']:.2f}" if peer else ""
            pr = f"{ours['ppl'] / r['ppl']:.4f}" if peer else ""
            spread = f" [{min(r['times']):.1f}-{max(r['times']):.1f}]" if len(r["times"]) > 1 else ""
            print(f"| {row} | {p} | {dtype} | {r['calib_s']:.1f}{spread} | {r['rss'] / 2**30:.2f} | {r['ppl']:.3f} | "
                  f"{r['ppl'] / fp[dtype]:.3f} | {tr} | {pr} |")


if __name__ == "__main__":
    main()
