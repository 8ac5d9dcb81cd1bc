"""Dequantize packed checkpoints with each format's own reference code; run in the readers'
venv (tests/readers/make_env.sh), never in shardquant's, and imports nothing of shardquant.

    python dequantize.py JOBS.json

JOBS.json is a list of {"format": "awq" | "gptq", "model": DIR, "out": DIR}. Each job writes
float32 safetensors under `out` holding every tensor of the checkpoint, the quantized linears
as dequantized `<name>.weight` [out, in]:

- awq: AutoAWQ's `awq/utils/packing_utils.py::dequantize_gemm` (unpack_awq, reverse_awq_order,
  then (q - z) * s), with the bits and group size read from config.json. The module is loaded
  from the installed package's file, so autoawq's heavy package __init__ (models, kernels) is
  not imported. Scales go in as float32 (the fp16 values, exactly) so the product is not
  rounded to fp16.
- gptq: GPTQModel's checkpoint dequantizer `gptqmodel.utils.model_dequant.dequantize_model`,
  which detects the format from config.json and undoes the v1 `zero - 1`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def awq_packing_utils():
    """AutoAWQ's packing_utils module, from the installed autoawq package."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("autoawq is not installed in this environment")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def dequantize_awq(model: Path, out: Path) -> None:
    qc = json.loads((model / "config.json").read_text())["quantization_config"]
    if (qc["quant_method"], qc["version"], qc["zero_point"]) != ("awq", "gemm", True):
        raise SystemExit(f"{model}: not an AWQ GEMM checkpoint with zero points: {qc}")
    pu = awq_packing_utils()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    result = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            prefix = key.removesuffix(".qweight")
            w = pu.dequantize_gemm(t, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"].float(),
                                   qc["bits"], qc["group_size"])
            result[f"{prefix}.weight"] = w.t().contiguous()
        elif not key.endswith((".qzeros", ".scales")):
            result[key] = t
    out.mkdir(parents=True)
    save_file(result, str(out / "dequantized.safetensors"))


def dequantize_gptq(model: Path, out: Path) -> None:
    from gptqmodel.utils.model_dequant import dequantize_model

    dequantize_model(model, out, target_dtype=torch.float32)


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        fn = {"awq": dequantize_awq, "gptq": dequantize_gptq}[job["format"]]
        fn(Path(job["model"]), Path(job["out"]))
        print(f"{job['format']}: {job['model']} -> {job['out']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
