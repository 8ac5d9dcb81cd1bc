"""End-to-end runs of the blockwise pipeline on tiny models: numbers, files, report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES, eval_windows, read_checkpoint, reference_ppl, run_config

from shardquant.config import build_config
from shardquant.execution.block_loop import put_record
from shardquant.pipeline import evaluate, quantize


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_method_matches_transformers(family, tiny_models, texts, tmp_path):
    """quant.method=none: blockwise perplexity equals transformers' forward of the whole model."""
    cfg = build_config(run_config(tiny_models[family], texts, tmp_path / "out", quant={"method": "none"},
                                  export={"format": "fake"}))
    report = quantize(cfg, show_progress=False)
    ref = reference_ppl(tiny_models[family], eval_windows(tiny_models[family], texts))
    assert report["ppl"]["quantized"] == pytest.approx(ref, rel=1e-5)
    assert report["ppl"]["fp"] == pytest.approx(ref, rel=1e-5)
    # The identity export holds the original weights, bit for bit.
    from safetensors.torch import load_file

    original = {}
    for f in tiny_models[family].glob("*.safetensors"):
        original.update(load_file(f))
    exported = read_checkpoint(tmp_path / "out" / "model")
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_fake_export_reloads_with_same_perplexity(family, method, tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    cfg = build_config(run_config(tiny_models[family], texts, out, quant={"method": method, "bits": 3},
                                  export={"format": "fake"}))
    report = quantize(cfg, show_progress=False)
    model_dir = out / "model"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "model.safetensors.index.json"):
        assert (model_dir / f).is_file(), f
    assert not list(out.glob(".model*")), "staging left behind"
    ppl = reference_ppl(model_dir, eval_windows(model_dir, texts))
    assert ppl == pytest.approx(report["ppl"]["quantized"], rel=1e-3)
    assert report["ppl"]["quantized"] != pytest.approx(report["ppl"]["fp"], rel=1e-4)
    # Every quantized linear holds at most 2**bits distinct values per (row, group).
    weights = read_checkpoint(model_dir)
    names = [n for n in weights if n.endswith("proj.weight")]
    assert len(names) == 7 * 3
    for n in names:
        w = weights[n]
        groups = w.reshape(w.shape[0], -1, 32)
        distinct = max(len(torch.unique(groups[r, g])) for r in range(0, w.shape[0], 7) for g in range(groups.shape[1]))
        assert distinct <= 8, (n, distinct)
    # lm_head is ignored by default: bit-identical to the source.
    from safetensors.torch import load_file

    src = {}
    for f in tiny_models[family].glob("*.safetensors"):
        src.update(load_file(f))
    assert torch.equal(weights["lm_head.weight"], src["lm_head.weight"])


def test_report_contents(tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    cfg = build_config(run_config(tiny_models["qwen2"], texts, out))
    report = quantize(cfg, show_progress=False)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk["ppl"]) == {"fp", "quantized"}
    assert on_disk["timing"]["total_s"] >= on_disk["timing"]["calibrate_s"] > 0
    assert on_disk["timing"]["idle_s"] == pytest.approx(sum(b["idle_s"] for b in on_disk["blocks"]))
    assert on_disk["memory"]["peak_rss_bytes"] > 10 * 2**20
    assert [b["index"] for b in on_disk["blocks"]] == [0, 1, 2]
    for b in on_disk["blocks"]:
        assert b["worker"] == "local" and b["seconds"] > 0
        # the phases and the unaccounted rest add up to the block's wall time
        phases = sum(b[k] for k in ("load_s", "forward_s", "stats_s", "solve_s", "search_s", "eval_s", "export_s"))
        assert b["idle_s"] >= 0 and phases + b["idle_s"] == pytest.approx(b["seconds"], rel=1e-6, abs=1e-9)
        assert b["forward_s"] > 0 and b["stats_s"] > 0 and b["solve_s"] > 0
        assert set(b["loss"]) == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        }
        assert all(v > 0 and math.isfinite(v) for v in b["loss"].values())
    assert on_disk["config"]["quant"]["method"] == "gptq"
    assert on_disk["config"]["model"]["path"] == str(tiny_models["qwen2"])
    assert on_disk["kernels"] == {"mode": "auto", "ran": {"gptq_block": "torch"}}  # auto on the CPU: the references
    # export.bytes: the tensor data of the written checkpoint, counted from what is on disk.
    written = sum(t.numel() * t.element_size() for t in read_checkpoint(out / "model").values())
    shards = len(list((out / "model").glob("*.safetensors")))
    assert on_disk["export"] == {
        "format": "compressed-tensors", "path": str(out / "model"), "bytes": written,
        "shards": shards, "adopted_shards": 3,
    }
    assert shards == 4  # the default (export.shard_size: block): each block's state file, and the rest
    assert (out / "report.md").read_text().startswith("# shardquant run")


def test_gptq_beats_rtn_and_propagation_modes(tiny_models, texts, tmp_path):
    """On the same windows GPTQ lands closer to fp than RTN; both propagation modes work."""
    results = {}
    for name, quant, calib in [
        ("rtn", {"method": "rtn", "bits": 3}, {}),
        ("gptq", {"method": "gptq", "bits": 3}, {}),
        ("gptq-fp", {"method": "gptq", "bits": 3}, {"propagate": "fp"}),
    ]:
        cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / name, quant=quant, calib=calib,
                                      export={"format": "fake"}))
        results[name] = quantize(cfg, show_progress=False)
    fp = results["rtn"]["ppl"]["fp"]
    gap = {k: r["ppl"]["quantized"] / fp - 1 for k, r in results.items()}
    assert gap["gptq"] < gap["rtn"]
    assert gap["gptq-fp"] < gap["rtn"]
    # Block 0 sees the same inputs in both modes; later blocks do not.
    q, f = results["gptq"]["blocks"], results["gptq-fp"]["blocks"]
    assert q[0]["loss"] == pytest.approx(f[0]["loss"], rel=1e-5)
    assert q[2]["loss"] != pytest.approx(f[2]["loss"], rel=1e-5)


def test_ignore_and_true_sequential(tiny_models, texts, tmp_path):
    base = run_config(tiny_models["llama"], texts, tmp_path / "a", quant={"ignore": ["lm_head", "down_proj"]},
                      export={"format": "fake"})
    quantize(build_config(base), show_progress=False)
    seq = read_checkpoint(tmp_path / "a" / "model")
    from safetensors.torch import load_file

    src = {}
    for f in tiny_models["llama"].glob("*.safetensors"):
        src.update(load_file(f))
    for i in range(3):
        n = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(seq[n], src[n])
        assert not torch.equal(seq[f"model.layers.{i}.mlp.up_proj.weight"], src[f"model.layers.{i}.mlp.up_proj.weight"])
    # One observation pass per block instead of one per group: the first group is identical
    # (it sees the same inputs), later groups see fp instead of quantized earlier groups.
    par = run_config(tiny_models["llama"], texts, tmp_path / "b", quant={"true_sequential": False})
    seqr = run_config(tiny_models["llama"], texts, tmp_path / "c")
    rp = quantize(build_config(par), show_progress=False)["blocks"][0]["loss"]
    rs = quantize(build_config(seqr), show_progress=False)["blocks"][0]["loss"]
    assert rp["self_attn.q_proj"] == pytest.approx(rs["self_attn.q_proj"], rel=1e-6)
    assert rp["mlp.down_proj"] != pytest.approx(rs["mlp.down_proj"], rel=1e-6)


def test_eval_command_matches_quantize_report(tiny_models, texts, tmp_path):
    out = tmp_path / "out"
    report = quantize(build_config(run_config(tiny_models["mistral"], texts, out, export={"format": "fake"})),
                      show_progress=False)
    ev = evaluate(
        build_config(run_config(out / "model", texts, tmp_path / "ev", quant={"method": "none"})),
        show_progress=False,
    )
    assert ev["ppl"] == pytest.approx(report["ppl"]["quantized"], rel=1e-4)
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["ppl"] == ev["ppl"]


def test_reproducible_bytes(tiny_models, texts, tmp_path):
    for name in ("a", "b"):
        quantize(build_config(run_config(tiny_models["qwen2"], texts, tmp_path / name)), show_progress=False)
    a = sorted((tmp_path / "a" / "model").glob("*.safetensors"))
    b = sorted((tmp_path / "b" / "model").glob("*.safetensors"))
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_put_record_replaces_a_redone_block_in_place():
    records = [{"index": 0, "v": "a"}, {"index": 1, "v": "b"}]
    assert put_record(records, {"index": 2, "v": "c"}) is False
    assert put_record(records, {"index": 1, "v": "b2"}) is True  # redone after a lost worker
    assert records == [{"index": 0, "v": "a"}, {"index": 1, "v": "b2"}, {"index": 2, "v": "c"}]


def test_data_free_rtn_reads_and_streams_no_calibration(tiny_models, texts, tmp_path):
    """Round to nearest with dynamic (or no) input quantization needs no calibration data: a
    calib.path that does not exist is never read, no block holds calibration activations, plan
    counts none and says so, and every weight is `quantize_rtn` of the original one. FP8's static
    input scale does need calibration, and its missing text is named."""
    from shardquant.algorithms.quantizer import QuantSpec
    from shardquant.algorithms.rtn import quantize_rtn
    from shardquant.errors import UserError
    from shardquant.tools.plan import plan_from_config

    missing = tmp_path / "no-such-calibration.txt"
    raw = run_config(tiny_models["llama"], texts, tmp_path / "out", quant={"method": "rtn", "group_size": 32},
                     calib={"path": str(missing)}, export={"format": "fake"})
    cfg = build_config(raw)
    report = quantize(cfg, show_progress=False)
    assert report["calibration"] == {"windows": 0, "tokens": 0}
    assert "- calibration: none (round to nearest" in (tmp_path / "out" / "report.md").read_text()
    assert all(b["activation_bytes"] == 0 for b in report["blocks"])
    plan = plan_from_config(cfg)
    assert "calib" not in plan.streams and any("data-free" in n for n in plan.notes)
    got = read_checkpoint(tmp_path / "out" / "model")
    want = read_checkpoint(tiny_models["llama"])
    spec = QuantSpec(bits=4, group_size=32, symmetric=True)
    linears = [k for k in want if ".mlp." in k or ".self_attn." in k]
    assert linears
    for k in linears:
        assert torch.equal(got[k], quantize_rtn(want[k].float(), spec).dequantize().to(want[k].dtype)), k
    static = build_config({**raw, "quant": {"method": "rtn", "scheme": "FP8"}, "output": str(tmp_path / "fp8")})
    with pytest.raises(UserError, match="calib.path"):
        quantize(static, show_progress=False)
