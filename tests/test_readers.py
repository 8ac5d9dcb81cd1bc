"""The formats' own reference code reads our packed checkpoints back into exactly the weights
of the `fake` export of the same run: AutoAWQ's `dequantize_gemm` for `awq`, GPTQModel's
checkpoint dequantizer for `gptq`, over several shapes, group sizes and bit widths, and on
mixture-of-experts checkpoints (DeepSeek-V3 through AWQ, Qwen2-MoE through GPTQ).

Those packages cannot share shardquant's environment, so they live in a venv of their own
(tests/readers/make_env.sh: PyPI only, torch pinned, cached under $SHARDQUANT_CACHE/readers;
the first build takes a few minutes). The checkpoints are written here and dequantized there
by tests/readers/dequantize.py in one subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import read_checkpoint, run_config, save_tiny_model

from shardquant.config import build_config
from shardquant.pipeline import quantize

READERS = Path(__file__).parent / "readers"
CALIB = {"n_samples": 4, "seq_len": 32}

# (id, format, model, quant): every case is exported twice, as `fake` and packed.
CASES = [
    ("awq-gptq4-g32-sym", "awq", "llama", {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}),
    ("awq-rtn4-g16-asym-bias-ignore", "awq", "qwen2",
     {"method": "rtn", "bits": 4, "group_size": 16, "symmetric": False, "ignore": ["lm_head", "down_proj"]}),
    ("awq-awq4-g64-asym-wide", "awq", "wide", {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False,
                                               "awq_grid": 4, "awq_clip_grid": 4}),
    ("awq-rtn4-g128-sym-wide", "awq", "wide", {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}),
    ("gptq-gptq4-g32-act_order", "gptq", "llama", {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                                                                "static_groups": False}),
    ("gptq-rtn2-channel", "gptq", "qwen3", {"method": "rtn", "bits": 2, "group_size": -1}),
    ("gptq-rtn8-g128-wide", "gptq", "wide", {"method": "rtn", "bits": 8, "group_size": 128}),
    ("gptq-gptq2-g64-static-wide", "gptq", "wide",
     {"method": "gptq", "bits": 2, "group_size": 64, "act_order": True, "static_groups": True}),
    # Mixture-of-experts checkpoints (tests/moe_fixtures.py): per-expert names, routers as floats.
    ("awq-awq4-g32-deepseek_v3", "awq", "deepseek_v3", {"method": "awq", "bits": 4, "group_size": 32,
                                                        "awq_grid": 4, "awq_clip_grid": 4}),
    ("gptq-gptq4-g32-act_order-qwen2_moe", "gptq", "qwen2_moe",
     {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "static_groups": False}),
]


# The first run builds the readers' venv from PyPI (minutes on a cold pip cache).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.timeout(2700)]


@pytest.fixture(scope="module")
def reader_python() -> str:
    """The readers' venv python (built on first use, then cached)."""
    proc = subprocess.run(["bash", str(READERS / "make_env.sh")], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"building the readers' venv failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dequantized(reader_python, tiny_models, moe_models, texts, tmp_path_factory) -> dict[str, tuple[dict, dict, Path]]:
    """case id -> (fake export's tensors, the reader's tensors, packed model dir)."""
    root = tmp_path_factory.mktemp("readers")
    models = {**tiny_models, **moe_models}
    models["wide"] = save_tiny_model(root / "wide", "llama", hidden=128, inter=256, layers=2)
    jobs, fakes = [], {}
    for case, fmt, family, quant in CASES:
        for f in ("fake", fmt):
            cfg = build_config(run_config(models[family], texts, root / case / f, quant=quant, calib=CALIB,
                                          export={"format": f}, eval={"enabled": False}))
            quantize(cfg, show_progress=False)
        fakes[case] = read_checkpoint(root / case / "fake" / "model")
        jobs.append({"format": fmt, "model": str(root / case / fmt / "model"), "out": str(root / case / "read")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"GPTQMODEL_CPU_WORKERS": "2"}
    proc = subprocess.run([reader_python, str(READERS / "dequantize.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    out = {}
    for case, fmt, _, _ in CASES:
        read = {}
        for f in sorted((root / case / "read").glob("*.safetensors")):
            read.update(load_file(f))
        out[case] = (fakes[case], read, root / case / fmt / "model")
    return out


@pytest.mark.parametrize(("case", "fmt", "family", "quant"), CASES, ids=[c[0] for c in CASES])
def test_reference_reader_gives_the_fake_weights(case, fmt, family, quant, dequantized):
    fake, read, packed_dir = dequantized[case]
    packed = read_checkpoint(packed_dir)
    marker = "qweight"
    linears = sorted(k.removesuffix(f".{marker}") for k in packed if k.endswith(f".{marker}"))
    assert linears, "no quantized linears"
    assert set(read) == set(fake)
    for name, w in fake.items():
        assert read[name].dtype == torch.float32, name
        assert torch.equal(read[name], w), name
    if family in ("deepseek_v3", "qwen2_moe"):  # every expert's linears packed under its own name
        experts = [n for n in linears if ".mlp.experts." in n]
        assert len(experts) == 2 * 3 * (8 if family == "deepseek_v3" else 4), experts
        assert not any(n.endswith((".mlp.gate", "shared_expert_gate")) for n in linears)
    # The quantized linears really were packed (not float weights passed through).
    for name in linears:
        assert f"{name}.weight" not in packed
        bits = quant["bits"]
        distinct = len(torch.unique(read[f"{name}.weight"][0]))
        assert distinct <= 2**bits * (1 if quant["group_size"] == -1 else fake[f"{name}.weight"].shape[1]
                                      // quant["group_size"]), name
    if quant.get("act_order") and not quant.get("static_groups"):
        g = packed[f"{linears[0]}.g_idx"].long()
        assert not torch.equal(g, torch.arange(len(g)) // quant["group_size"]), "expected a non-trivial g_idx"
