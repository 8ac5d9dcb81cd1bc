"""The Ray executor's cost and memory, measured side by side with the local executor.

Usage:
  python benchmarks/ray_scaling.py overhead [--calib 32] [--method gptq]
      SmolLM2-135M, same job with cluster.backend local and ray (1 worker): wall-time ratio.
  python benchmarks/ray_scaling.py memory [--gb 4] [--workers 2]
      A random Llama-shaped model of about --gb GB (fp32 on disk), RTN with 2 Ray workers:
      the peak RSS of every process (driver and each worker) over the model's size, and the
      driver's RSS sampled from /proc (anonymous vs. shared/file-backed pages, and when).
  python benchmarks/ray_scaling.py stages [--calib 16] [--workers 2]
      SmolLM2-135M with calib.propagate fp: pipeline stages on 2 Ray workers against the local
      run: wall-time ratio and the share of calibration time with two stages busy at once.
Measured, never asserted; paste the printed table into benchmarks/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from _common import run_quantize, smollm2_protocol


def _rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes: Rss, Anonymous, Shmem and file-backed pages."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, rest = line.split(":", 1)
            out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_sampled(cfg: dict, workdir: Path, every: float = 0.2) -> tuple[dict, dict[str, float]]:
    """`shardquant quantize` in a fresh process, its RSS sampled from /proc: the report and the
    driver's peak RSS with what made it up (anonymous vs. file-backed/shared pages) and when."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "shardquant", "quantize", str(workdir / "run.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[str, float] = {"Rss": 0}
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.strip()[-120:]))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while proc.poll() is None:
        r = _rollup(proc.pid)
        if r.get("Rss", 0) > peak["Rss"]:
            peak = {**r, "at_s": time.perf_counter() - t0, "last_line": lines[-1][1] if lines else ""}
        time.sleep(every)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"shardquant failed ({proc.returncode}):\n" + "\n".join(x for _, x in lines[-30:]))
    peak["total_s"] = time.perf_counter() - t0
    return json.loads((Path(cfg["output"]) / "report.json").read_text()), peak


def overhead(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-ray-overhead-"))
    rows = []
    for name, cluster in (("local", {"backend": "local"}), ("ray, 1 worker", {"backend": "ray", "workers": 1,
                                                                                "cpus_per_worker": 2})):
        cfg = smollm2_protocol(calib_n=args.calib, eval_n=4, seq_len=512)
        cfg["quant"] = {"method": args.method, "bits": 4, "group_size": 64}
        cfg["export"]["format"] = "fake"
        cfg["cluster"] = cluster
        cfg["output"] = str(out / name.split(",")[0])
        t = time.perf_counter()
        rep = run_quantize(cfg, out / name.split(",")[0])
        rows.append((name, time.perf_counter() - t, rep["timing"]["calibrate_s"], rep["ppl"]["quantized"]))
    base = rows[0][1]
    print(f"SmolLM2-135M, {args.method} 4-bit g64, {args.calib} x 512 calibration tokens, 4 x 512 eval")
    print("| executor | wall s (process) | calibrate_s | ppl | wall / local |\n| --- | --- | --- | --- | --- |")
    for name, wall, cal, ppl in rows:
        print(f"| {name} | {wall:.1f} | {cal:.1f} | {ppl:.3f} | {wall / base:.2f} |")


def _random_model(root: Path, gb: float) -> Path:
    """A random Llama of about `gb` GB in fp32, saved as sharded safetensors with a tokenizer."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter = 2048, 5632
    per_block = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((gb * 1e9 / 4 - 2 * 320 * hidden) / per_block))
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    path = root / "model"
    model.save_pretrained(path, max_shard_size="500MB")
    build_tokenizer(path)
    return path


def memory(args: argparse.Namespace) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_text

    out = Path(args.out or tempfile.mkdtemp(prefix="sq-ray-memory-"))
    model = _random_model(out, args.gb)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    text = out / "calib.txt"
    text.write_text(make_text(20000, 1))
    cfg = {
        "model": {"path": str(model)},
        "calib": {"path": str(text), "n_samples": 16, "seq_len": 256, "batch_size": 4},
        "quant": {"method": args.method, "bits": 4, "group_size": 128},
        "eval": {"enabled": False},
        "export": {"format": "compressed-tensors"},
        "cluster": {"backend": "ray", "workers": args.workers, "cpus_per_worker": 1},
        "output": str(out / "run"),
    }
    rep, sampled = run_sampled(cfg, out / "run")
    peaks = {"driver": rep["memory"]["driver_peak_rss_bytes"], **rep["cluster"]["peak_rss_bytes"]}
    print(f"random Llama, {size / 1e9:.2f} GB fp32 on disk, {args.method} 4-bit g128, {args.workers} Ray workers")
    print("| process | peak RSS GB | / model size |\n| --- | --- | --- |")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 1e9:.2f} | {peak / size:.3f} |")
    print(f"| max over all processes (report.json memory.peak_rss_bytes) | {rep['memory']['peak_rss_bytes'] / 1e9:.2f} | "
          f"{rep['memory']['peak_rss_bytes'] / size:.3f} |")
    anon = sampled.get("Anonymous", 0)
    print(f"\ndriver sampled from /proc every 0.2 s: peak Rss {sampled['Rss'] / 1e9:.2f} GB at "
          f"{sampled.get('at_s', 0):.0f} s of {sampled['total_s']:.0f} s (anonymous {anon / 1e9:.2f} GB, "
          f"shared/file-backed {(sampled['Rss'] - anon) / 1e9:.2f} GB); last progress line: "
          f"{sampled.get('last_line', '')!r}")


def stages(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="sq-ray-stages-"))
    rows = {}
    for name, cluster in (("local", {"backend": "local"}),
                          (f"ray stages, {args.workers} workers", {"backend": "ray", "workers": args.workers,
                                                                   "cpus_per_worker": 1})):
        cfg = smollm2_protocol(calib_n=args.calib, eval_n=4, seq_len=512)
        cfg["quant"] = {"method": "gptq", "bits": 4, "group_size": 64}
        cfg["calib"]["propagate"] = "fp"
        cfg["export"]["format"] = "fake"
        cfg["cluster"] = cluster
        tag = name.split(",")[0].replace(" ", "-")
        cfg["output"] = str(out / tag)
        t = time.perf_counter()
        rep = run_quantize(cfg, out / tag)
        rows[name] = (time.perf_counter() - t, rep)
    print(f"SmolLM2-135M, gptq 4-bit g64, propagate fp, {args.calib} x 512 calibration tokens, 4 x 512 eval")
    print("| run | wall s (process) | calibrate_s | ppl | two or more stages busy | per stage busy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (wall, rep) in rows.items():
        st = (rep.get("cluster") or {}).get("stages") or {}
        busy = ", ".join(f"{k} {v:.0%}" for k, v in st.get("busy", {}).items())
        both = f"{st['two_or_more_busy']:.0%} of {st['wall_s']:.0f} s" if st else ""
        print(f"| {name} | {wall:.1f} | {rep['timing']['calibrate_s']:.1f} | {rep['ppl']['quantized']:.4f} | "
              f"{both} | {busy} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--calib", type=int, default=32)
    o.add_argument("--method", default="gptq")
    o.add_argument("--out", default=None)
    m = sub.add_parser("memory")
    m.add_argument("--gb", type=float, default=4.0)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--method", default="rtn")
    m.add_argument("--out", default=None)
    st = sub.add_parser("stages")
    st.add_argument("--calib", type=int, default=16)
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--out", default=None)
    args = ap.parse_args()
    {"overhead": overhead, "memory": memory, "stages": stages}[args.what](args)


if __name__ == "__main__":
    main()
