"""The quickstart on the real SmolLM2-135M and Shakespeare, as a user runs it (slow: minutes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from shardquant.config import build_config
from shardquant.pipeline import evaluate, quantize
from shardquant.tools.quickstart import quickstart_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "shardquant", "quickstart", "--output", str(out), "--quiet"],
        capture_output=True, text=True, timeout=3000,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, json.loads((out / "report.json").read_text())


def test_quickstart_end_to_end(quickstart_run):
    proc, out, report = quickstart_run
    assert f"checkpoint: {out / 'model'}" in proc.stdout
    assert "perplexity fp" in proc.stdout
    fp, q = report["ppl"]["fp"], report["ppl"]["quantized"]
    assert 20 < fp < 80, fp  # SmolLM2-135M on Macbeth: about 41
    assert fp < q < 1.5 * fp, (fp, q)
    assert len(report["blocks"]) == 30
    assert report["config"]["quant"] | {"method": "gptq", "bits": 4, "group_size": 64} == report["config"]["quant"]
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # 200MB shards of a 540 MB model
    assert "lm_head.weight" not in index["weight_map"]  # tied embeddings stay tied


def test_export_reloads_in_transformers(quickstart_run, tmp_path):
    """transformers' own forward of the exported checkpoint gives our blockwise perplexity."""
    from transformers import AutoModelForCausalLM

    _, out, report = quickstart_run
    data = report["config"] | {"model": {"path": str(out / "model")}, "output": str(tmp_path / "ev")}
    data["eval"] = data["eval"] | {"n_samples": 2}
    data["quant"] = data["quant"] | {"method": "none"}
    ev = evaluate(build_config(data), show_progress=False)
    from transformers import AutoTokenizer

    from shardquant.data import load_text, token_windows

    tok = AutoTokenizer.from_pretrained(out / "model")
    windows = token_windows(tok, load_text(data["eval"]["path"], key="eval.path"), n_samples=2,
                            seq_len=512, seed=0, mode="sequential", key="eval")
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.exp(nll.item()) == pytest.approx(ev["ppl"], rel=1e-3)


def test_gptq_beats_rtn_on_the_real_model(quickstart_run, tmp_path):
    _, _, gptq = quickstart_run
    cfg = quickstart_config(tmp_path / "rtn")
    rtn = quantize(build_config(cfg.model_dump(mode="json") | {"quant": cfg.quant.model_dump() | {"method": "rtn"},
                                                              "eval": cfg.eval.model_dump() | {"fp": False}}),
                   show_progress=False)
    assert gptq["ppl"]["quantized"] < 0.97 * rtn["ppl"]["quantized"], (gptq["ppl"], rtn["ppl"])


def test_compressed_tensors_export_of_smollm2_loads_with_fake_logits(tmp_path):
    """The same RTN run exported as compressed-tensors and as fake: transformers (with the
    compressed-tensors package) loads both, and the logits agree."""
    from transformers import AutoModelForCausalLM

    base = quickstart_config(tmp_path / "unused").model_dump(mode="json")
    outs = {}
    for fmt in ("fake", "compressed-tensors"):
        data = base | {"quant": base["quant"] | {"method": "rtn"}, "eval": base["eval"] | {"enabled": False},
                       "calib": base["calib"] | {"n_samples": 1}, "export": base["export"] | {"format": fmt},
                       "output": str(tmp_path / fmt)}
        quantize(build_config(data), show_progress=False)
        outs[fmt] = tmp_path / fmt / "model"
    config = json.loads((outs["compressed-tensors"] / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fmt, path in outs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            logits[fmt] = model(windows).logits.float()
        del model
    err = (logits["fake"] - logits["compressed-tensors"]).abs().max().item()
    assert err < 1e-3 * logits["fake"].abs().max().item(), err
