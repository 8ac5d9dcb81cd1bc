"""Spilled activations (`cluster.spill`): read and write throughput of DeepSpeed's async I/O,
plain files and memory, and the end-to-end time of a spilling run against an in-memory one.

Usage: nice -n 10 python benchmarks/spill.py [--gib 1] [--batch-mib 32] [--dir DIR] [--skip-e2e]

Throughput: `--gib` of float32 batches of `--batch-mib` go through an `ActivationStore` that
spills everything (budget 0), written (`put`, then `flush`) and read back in order (`iter`,
one batch ahead), best of three. `disk` is measured twice: as a run sees it (reads may come
from the page cache the writes filled) and cold (each file fsync'd and dropped from the page
cache before the reads, so they come from the device). `aio` is O_DIRECT: always the device.
`memory` is a tensor copy of the same bytes. Targets: aio at least 1.5x plain-file throughput.

End to end: a random Llama (hidden 512, 4 blocks) quantized with GPTQ 4-bit in its own
process, activations in memory, then capped at 4 MiB with `disk` and with `aio` (every
other batch spilled); the ratio of `timing.total_s`. Target: a spilling run at most 1.2x the
in-memory run, because the reads overlap compute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, run_quantize

sys.path.insert(0, str(ROOT))
from shardquant.execution import spill  # noqa: E402
from shardquant.execution.activations import ActivationStore  # noqa: E402


def _drop_cache(root: Path) -> None:
    """fsync every spilled file under `root` and drop its pages from the page cache."""
    for f in root.rglob("*.bin"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_throughput(mode: str, root: Path, batches: list[torch.Tensor], cold: bool) -> tuple[float, float]:
    """(write, read) bytes per second of one spill-everything store."""
    total = sum(t.numel() * t.element_size() for t in batches)
    store = ActivationStore(budget=0, spill_dir=str(root), tag=f"bench_{mode}", spill=mode)
    t0 = time.perf_counter()
    store.put("s", batches)
    store.flush()
    write = total / (time.perf_counter() - t0)
    if cold:
        _drop_cache(root)
    t0 = time.perf_counter()
    for t in store.iter("s"):
        del t
    read = total / (time.perf_counter() - t0)
    store.clear()
    return write, read


def memory_throughput(batches: list[torch.Tensor]) -> tuple[float, float]:
    total = sum(t.numel() * t.element_size() for t in batches)
    t0 = time.perf_counter()
    copies = [t.clone() for t in batches]
    write = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    back = [c.clone() for c in copies]
    read = total / (time.perf_counter() - t0)
    del copies, back
    return write, read


def build_model(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    build_tokenizer(path, vocab_size=512)


def e2e(work: Path, spill_root: Path, modes: list[str]) -> dict[str, dict]:
    model = work / "llama"
    build_model(model)
    text = work / "text.txt"
    rng = torch.Generator().manual_seed(0)
    words = [f"w{int(i)}" for i in torch.randint(0, 400, (200_000,), generator=rng)]
    text.write_text(" ".join(words))
    base = {
        "model": {"path": str(model)},
        "calib": {"path": str(text), "n_samples": 64, "seq_len": 256, "batch_size": 8},
        "eval": {"path": str(text), "n_samples": 16, "seq_len": 256, "batch_size": 8},
        "quant": {"method": "gptq", "bits": 4, "group_size": 128},
        "export": {"format": "fake"},
    }
    reports = {}
    for name in ["memory", *modes]:
        cfg = {**base, "output": str(work / name)}
        if name != "memory":
            cfg["cluster"] = {"activation_memory": "4MiB", "spill": name, "spill_dir": str(spill_root)}
        reports[name] = run_quantize(cfg, work / f"{name}-cfg")
    return reports


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="bytes per throughput measurement (GiB)")
    ap.add_argument("--batch-mib", type=int, default=32)
    ap.add_argument("--dir", default=None, help="spill directory (default: the temp dir)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="spill-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    problem = spill.aio_problem()
    modes = ["disk"] + (["aio"] if problem is None else [])
    print(f"spill directory {root} ({spill.filesystem(root)}); aio: {problem or 'available'}")
    n = max(1, int(args.gib * 1024 / args.batch_mib))
    numel = args.batch_mib * 2**20 // 4
    batches = [torch.randn(numel) for _ in range(n)]
    print(f"{n} batches of {args.batch_mib} MiB ({n * args.batch_mib} MiB), best of 3, MB/s = 10^6 B/s")
    runs = {"memory": [memory_throughput(batches) for _ in range(3)]}
    runs["disk (page cache)"] = [store_throughput("disk", root, batches, cold=False) for _ in range(3)]
    runs["disk (cold reads)"] = [store_throughput("disk", root, batches, cold=True) for _ in range(3)]
    if "aio" in modes:
        runs["aio"] = [store_throughput("aio", root, batches, cold=False) for _ in range(3)]
    print("| backend | write MB/s | read MB/s |")
    print("| --- | --- | --- |")
    best = {}
    for name, got in runs.items():
        best[name] = (max(w for w, _ in got), max(r for _, r in got))
        print(f"| {name} | {best[name][0] / 1e6:.0f} | {best[name][1] / 1e6:.0f} |")
    if "aio" in best:
        for ref in ("disk (page cache)", "disk (cold reads)"):
            w, r = (a / b for a, b in zip(best["aio"], best[ref], strict=True))
            print(f"aio / {ref}: write {w:.2f}x, read {r:.2f}x (target >= 1.5x)")
    del batches
    if args.skip_e2e:
        return
    with tempfile.TemporaryDirectory(prefix="spill-e2e-") as work:
        reports = e2e(Path(work), root, modes)
    mem = reports["memory"]["timing"]["total_s"]
    print("| run | total s | calibrate s | spilled written MiB | read MiB | write MB/s | read MB/s | "
          "compute waited s | vs memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rep in reports.items():
        s, t = rep["spill"], rep["timing"]
        print(f"| {name} | {t['total_s']:.1f} | {t['calibrate_s']:.1f} | {s['written_bytes'] / 2**20:.1f} | "
              f"{s['read_bytes'] / 2**20:.1f} | {_rate(s['write_bytes_per_s'])} | {_rate(s['read_bytes_per_s'])} | "
              f"{s['wait_s']:.2f} | {t['total_s'] / mem:.3f}x |")
    same = {name: rep["ppl"] for name, rep in reports.items()}
    print(f"perplexities (must agree): {same}")
    print(f"median spill slowdown: {statistics.median(r['timing']['total_s'] / mem for n, r in reports.items() if n != 'memory'):.3f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
