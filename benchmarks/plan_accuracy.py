"""`shardquant plan` against measurement: each process's peak RSS (VmHWM) vs the plan's peak.

Usage: python benchmarks/plan_accuracy.py [--widths 1024 2048 4096] [--methods gptq awq]
                                          [--backends local ray] [--out DIR] [--reuse | --replan] [--jobs N]

Random Llama models (fp32 safetensors, vocab 512, MLP 3.5 x hidden, heads hidden/128, 8 KV
heads, 4 at width 1024; 3 blocks, 2 at width 4096; every block >= 50 MB) are quantized
(4-bit, group 128, AWQ grids 4, defaults otherwise; 16 x 256 calibration tokens, batch 4, no
eval) locally and on 2 private Ray workers, each run in a fresh process. Prints, per run and process,
measured vs planned GiB (`shardquant plan CONFIG --json --device cpu`, a fresh process, so
the installed plan is measured: each worker against its rank's `worker_peaks`, the driver
against `driver`), the plan's memory terms (rank 0's), and the footprint of an idle
process and an idle Ray worker. `--reuse` keeps the runs already in DIR (runs the rest);
`--replan` runs nothing and re-plans the runs in DIR.
Measured, never asserted; paste the tables into benchmarks/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from _common import ROOT, run_quantize

GIB = 2**30
VOCAB = 512
TERMS = ("framework", "weights", "activations", "solved_codes", "fp32_copies", "hessians", "awq_captures", "stage_cache",
         "workspace", "block_phase", "outside_phase", "peak")
IMPORTS = "import torch, transformers, shardquant, shardquant.pipeline, shardquant.execution.worker"
# AWQ's searches loop over their candidates (the memory of one is the memory of all): 4 of
# each instead of 20 keeps a 4096-wide run in minutes on 2 shared cores.
AWQ_GRIDS = {"awq_grid": 4, "awq_clip_grid": 4}
VMHWM = ("int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024")


def env() -> dict[str, str]:
    """This interpreter's bin first on PATH; Ray listens on loopback only."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def shape(hidden: int) -> dict[str, int]:
    heads = hidden // 128
    return {"hidden_size": hidden, "intermediate_size": hidden * 7 // 2, "num_attention_heads": heads,
            "num_key_value_heads": 4 if hidden <= 1024 else 8, "num_hidden_layers": 2 if hidden >= 4096 else 3}


def build(path: Path, hidden: int) -> int:
    """Save a random Llama of this width at `path` (unless there); return one block's fp32 bytes."""
    s = shape(hidden)
    h, i, kv = hidden, s["intermediate_size"], s["num_key_value_heads"] * 128
    block = (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) * 4
    if (path / "config.json").is_file():
        return block
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer

    cfg = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=1024, **s)
    torch.manual_seed(hidden)
    model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.model.layers[0].parameters()) * 4 == block
    model.save_pretrained(path, max_shard_size="500MB")
    build_tokenizer(path, vocab_size=VOCAB)
    del model
    return block


def run_config(model: Path, text: Path, method: str, backend: str, output: Path) -> dict:
    cluster = {"backend": "ray", "workers": 2, "cpus_per_worker": 1} if backend == "ray" else {"backend": "local"}
    return {
        "model": {"path": str(model), "device": "cpu"},
        "calib": {"path": str(text), "n_samples": 16, "seq_len": 256, "batch_size": 4},
        "quant": {"method": method, "bits": 4, "group_size": 128, **(AWQ_GRIDS if method == "awq" else {})},
        "eval": {"enabled": False},
        "cluster": cluster,
        "output": str(output),
    }


def plan(cfg_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "shardquant", "plan", str(cfg_path), "--json", "--device", "cpu"],
                         capture_output=True, text=True, env=env(), check=True)
    return json.loads(out.stdout)


def idle_process() -> int:
    """VmHWM of a python that imports what a run imports and loads nothing."""
    code = f"{IMPORTS}\nprint({VMHWM})"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(),
                              check=True).stdout)


IDLE_RAY = f"""
import ray
ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=1)
class Idle:
    def bare(self):
        return {VMHWM}
    def loaded(self):
        {IMPORTS}
        return {VMHWM}

a, b = Idle.remote(), Idle.remote()
print(ray.get(a.bare.remote()), ray.get(b.loaded.remote()), {VMHWM})
ray.shutdown()
"""


def idle_ray() -> tuple[int, int, int]:
    """VmHWM of an idle Ray actor (bare; after the run's imports) and of its driver."""
    out = subprocess.run([sys.executable, "-c", IDLE_RAY], capture_output=True, text=True, env=env(), check=True)
    bare, loaded, driver = (int(v) for v in out.stdout.split()[-3:])
    return bare, loaded, driver


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    ap.add_argument("--backends", nargs="+", default=["local", "ray"])
    ap.add_argument("--out", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--reuse", action="store_true", help="keep runs whose report.json is already in --out")
    ap.add_argument("--replan", action="store_true", help="run nothing: re-plan the runs already in --out")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (peak RSS is per process: unaffected)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text

    work = Path(args.out or tempfile.mkdtemp(prefix="sq-plan-acc-"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    if not text.is_file():
        text.write_text(make_text(20000, 1))
    idle = idle_process()
    bare_actor, ray_actor, ray_driver = idle_ray()
    print(f"work dir {work}")
    print(f"idle process ({IMPORTS}): {idle / GIB:.3f} GiB")
    print(f"idle Ray actor: bare {bare_actor / GIB:.3f} GiB, after the imports {ray_actor / GIB:.3f} GiB; "
          f"driver after ray.init {ray_driver / GIB:.3f} GiB\n")

    runs = []  # (width, method, backend, run dir, config)
    for width in args.widths:
        model = work / f"llama-{width}"
        block = build(model, width)
        print(f"width {width}: {shape(width)}, block {block / 2**20:.0f} MiB fp32", flush=True)
        for method in args.methods:
            for backend in args.backends:
                rundir = work / "runs" / f"{width}-{method}-{backend}"
                cfg = run_config(model, text, method, backend, rundir / "out")
                rundir.mkdir(parents=True, exist_ok=True)
                (rundir / "run.yaml").write_text(yaml.safe_dump(cfg))
                runs.append((width, method, backend, rundir, cfg))

    def run(job: tuple) -> None:
        width, method, backend, rundir, cfg = job
        shutil.rmtree(rundir / "out", ignore_errors=True)  # a run resumes from what it finds there
        t0 = time.perf_counter()
        rep = run_quantize(cfg, rundir, env=env())
        print(f"  {width} {method} {backend}: {time.perf_counter() - t0:.0f} s, "
              f"peak {rep['memory']['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)

    done = [j for j in runs if (j[3] / "out" / "report.json").is_file()]
    todo = [] if args.replan else [j for j in runs if not (args.reuse and j in done)]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, todo))
    if args.replan:
        runs = done

    rows, term_rows = [], []
    for width, method, backend, rundir, _ in runs:
        rep = json.loads((rundir / "out" / "report.json").read_text())
        planned_json = plan(rundir / "run.yaml")
        mem = planned_json["memory"]
        term_rows.append((width, method, backend, mem))
        ranks, base = planned_json["worker_peaks"], ray_actor if backend == "ray" else idle
        if backend == "ray":
            procs = [("driver", rep["memory"]["driver_peak_rss_bytes"], planned_json["driver"], ray_driver)]
            procs += [(w, v, ranks[int(w[1:])], base) for w, v in rep["cluster"]["peak_rss_bytes"].items()]
        else:
            procs = [("process", rep["memory"]["peak_rss_bytes"], ranks[0], base)]
        rows += [(width, method, backend, *p) for p in procs]

    print("\n| width | method | backend | process | measured GiB | planned GiB | ratio | "
          "measured − idle GiB | ratio − idle |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for width, method, backend, proc, measured, pl, b in rows:
        if pl is None:
            cells = ["—", "—", f"{(measured - b) / GIB:.2f}", "—"]
        else:
            cells = [f"{pl / GIB:.2f}", f"{measured / pl:.2f}", f"{(measured - b) / GIB:.2f}",
                     f"{(measured - b) / pl:.2f}"]
        print(f"| {width} | {method} | {backend} | {proc} | {measured / GIB:.2f} | " + " | ".join(cells) + " |")
    print("\nplan's memory terms per worker, GiB:\n")
    print("| width | method | backend | " + " | ".join(TERMS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in TERMS) + " |")
    for width, method, backend, mem in term_rows:
        print(f"| {width} | {method} | {backend} | " + " | ".join(f"{mem.get(t, 0) / GIB:.3f}" for t in TERMS) + " |")
    (work / "results.json").write_text(json.dumps({
        "idle": {"process": idle, "ray_actor_bare": bare_actor, "ray_actor": ray_actor, "ray_driver": ray_driver},
        "rows": [dict(zip(("width", "method", "backend", "process", "measured", "planned", "idle"), r, strict=True))
                 for r in rows],
        "terms": [{"width": w, "method": m, "backend": b, "memory": mem} for w, m, b, mem in term_rows],
    }, indent=1))


if __name__ == "__main__":
    main()
