"""AWQ's scale search on one block of SmolLM2-135M: block time and search time per setting.

Usage: python benchmarks/awq_search.py [--calib 64] [--seq-len 512] [--block 3]
                                       [--setting NAME=KEY:VALUE[,KEY:VALUE]] ...

Embeds the calibration windows (the peers' protocol), runs them through the blocks before
``--block`` in full precision, then times `calibrate_block` (observe, search, fold, clip,
RTN) on that block once per setting, each on a fresh copy of the same inputs, in one process.
The default settings compare the scale search on every window (the previous behaviour),
on 8 and 4 windows, and on the group's own linears. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import smollm2_protocol

DEFAULT = {
    "all windows": {"awq_search_samples": None},
    "8 windows": {"awq_search_samples": 8},
    "4 windows (default)": {"awq_search_samples": 4},
    "linears": {"awq_search_objective": "linears"},
}


def parse_setting(text: str) -> tuple[str, dict[str, object]]:
    name, _, body = text.partition("=")
    quant: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        quant[key] = None if value == "null" else int(value) if value.isdigit() else value
    return name, quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=KEY:VALUE[,KEY:VALUE]")
    args = ap.parse_args()
    settings = dict(parse_setting(s) for s in args.setting) or DEFAULT

    from shardquant.calib.steps import BlockProfile, calibrate_block
    from shardquant.config import RunConfig
    from shardquant.data import load_text, token_windows
    from shardquant.execution.local import LocalExecutor

    proto = smollm2_protocol(calib_n=args.calib, eval_n=1, seq_len=args.seq_len)
    out = tempfile.mkdtemp(prefix="sq-awq-search-")
    base = {"model": {**proto["model"], "device": "cpu"}, "export": {"format": "fake"}, "output": out,
            "calib": proto["calib"]}
    first = LocalExecutor(RunConfig.model_validate({**base, "quant": {"method": "rtn"}}))
    src = first.worker.source
    windows = token_windows(src.tokenizer(), load_text(proto["calib"]["path"], key="calib.path"),
                            n_samples=args.calib, seq_len=args.seq_len, seed=0, mode="random", key="calib")
    first.setup(windows, None, do_fp_eval=False)
    for i in range(args.block):  # full-precision inputs of the timed block
        first.worker.begin_block(i)
        first.worker.store.map("calib", lambda h, i=i: first.worker.runner.forward(first.worker.block, i, h))
        src.release(first.worker.block)
        first.worker.block = None
    inputs = [h.clone() for h in first.worker.store.iter("calib")]
    first.close()

    name = f"{src.adapter.blocks}.{args.block}"
    rows = []
    for label, quant in settings.items():
        cfg = RunConfig.model_validate({**base, "quant": {"method": "awq", "bits": 4, "group_size": 64, **quant}})
        ex = LocalExecutor(cfg)
        ex.worker.store.put("calib", [h.clone() for h in inputs])
        ex.begin_block(args.block)
        prof = BlockProfile()
        t = time.perf_counter()
        calibrate_block(ex, name, src.skeleton.get_submodule(name), src.adapter, cfg.quant, prof)
        seconds = time.perf_counter() - t
        search = ex.worker.profile.extra.get("search_s", 0.0)
        ratios = {g: r["ratio"] for g, r in prof.awq.items()}
        rows.append((label, seconds, search, ratios))
        print(f"[{label}] block {seconds:.1f} s, search {search:.1f} s, ratios {ratios}", flush=True)
        ex.close()
        del ex

    print(f"\nblock {args.block}, {args.calib} x {args.seq_len} calibration tokens, {torch.get_num_threads()} threads\n")
    print("| search | block s | of which search s | chosen exponent per group |")
    print("| --- | --- | --- | --- |")
    for label, seconds, search, ratios in rows:
        chosen = ", ".join(f"{g} {r}" for g, r in ratios.items())
        print(f"| {label} | {seconds:.1f} | {search:.1f} | {chosen} |")


if __name__ == "__main__":
    main()
