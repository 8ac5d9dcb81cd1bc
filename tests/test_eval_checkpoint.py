"""`shardquant eval CHECKPOINT`: packed checkpoints read block by block from their packed
tensors, against the fake export of the same run and against transformers' own load."""

from __future__ import annotations

import json
import math
import os

# Triton's CPU interpreter for `kernels.mode: triton` (the W4A16 kernel), set before triton is
# first imported, as tests/test_kernels.py does; `auto` and `torch` do not read it.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import eval_windows, reference_ppl, run_config, save_tiny_model  # noqa: E402

from shardquant.cli import main  # noqa: E402
from shardquant.config import RunConfig  # noqa: E402
from shardquant.pipeline import quantize  # noqa: E402

RTN = {"method": "rtn", "bits": 4, "group_size": 32}


@pytest.fixture(scope="module")
def rtn_exports(tmp_path_factory, texts, one_thread) -> dict[str, object]:
    """One 2-block llama quantized by RTN (deterministic) into every format: the packed ones and
    the fake (dequantized) export of the same symmetric and asymmetric schemes."""
    root = tmp_path_factory.mktemp("eval-ckpt")
    model = save_tiny_model(root / "llama", "llama", layers=2)
    out: dict[str, object] = {"model": model, "root": root}
    for name, fmt, sym in (("fake", "fake", True), ("fake-asym", "fake", False),
                           ("compressed-tensors", "compressed-tensors", True),
                           ("compressed-tensors-asym", "compressed-tensors", False),
                           ("gptq", "gptq", True), ("awq", "awq", True)):
        cfg = run_config(model, texts, root / name, quant={**RTN, "symmetric": sym}, export={"format": fmt},
                         calib={"n_samples": 2, "seq_len": 32}, eval={"enabled": False})
        quantize(RunConfig.model_validate(cfg), show_progress=False)
        out[name] = root / name / "model"
    return out


def _eval(checkpoint, texts, output, capsys) -> dict:
    rc = main(["eval", str(checkpoint), f"--eval.path={texts['eval']}", "--eval.n_samples=4", "--eval.seq_len=64",
               f"--output={output}", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((output / "eval.json").read_text())


@pytest.mark.parametrize(("fmt", "fake"), [("compressed-tensors", "fake"), ("compressed-tensors-asym", "fake-asym"),
                                           ("gptq", "fake"), ("awq", "fake")])
def test_packed_eval_equals_fake_export(rtn_exports, texts, tmp_path, capsys, fmt, fake):
    packed = _eval(rtn_exports[fmt], texts, tmp_path / "packed", capsys)
    dense = _eval(rtn_exports[fake], texts, tmp_path / "dense", capsys)
    assert packed["format"] == fmt.removesuffix("-asym") and dense["format"] == "dense"
    assert packed["ppl"] == pytest.approx(dense["ppl"], rel=1e-3)
    # and the fake export is transformers' own forward of the same weights
    windows = eval_windows(rtn_exports[fake], texts, n=4, seq_len=64)
    assert dense["ppl"] == pytest.approx(reference_ppl(rtn_exports[fake], windows), rel=1e-4)


def test_packed_linear_equals_dequantized_weight(rtn_exports):
    """Each format's reader gives the fake export's weight of every linear (fp16 scales of
    gptq/awq round to the same values the fake export holds, to float tolerance)."""
    from shardquant.model.source import ModelSource

    fake = ModelSource(rtn_exports["fake"])
    for fmt in ("compressed-tensors", "gptq", "awq"):
        src = ModelSource(rtn_exports[fmt], packed=True)
        assert src.packed is not None and src.packed.layout.name == fmt
        a, b = src.block(1), fake.block(1)
        for name in src.block_linears(1):
            wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
            torch.testing.assert_close(wa, wb, rtol=1e-3, atol=1e-4), (fmt, name)
        src.release(a)
        fake.release(b)


@pytest.fixture
def interpreted_kernels():
    """The W4A16 kernel and triton's own jit functions really are interpreted."""
    pytest.importorskip("triton", reason="triton is not installed: the W4A16 kernel cannot run")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from shardquant.kernels import w4a16

    for fn in (w4a16._w4a16_kernel, tl.zeros):
        assert isinstance(fn, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1"


def test_packed_eval_through_the_w4a16_kernel_equals_the_dequantized_path(rtn_exports, texts, tmp_path, capsys,
                                                                           interpreted_kernels):
    """`kernels.mode: triton` keeps each compressed-tensors int4 linear of a block packed
    (`PackedLinear`, the W4A16 kernel in the interpreter) and gives the perplexity of the
    dequantized path (`torch`), symmetric and asymmetric; eval.json says which ran."""
    from shardquant.kernels import select
    from shardquant.kernels.w4a16 import PackedLinear
    from shardquant.model.source import ModelSource

    args = ["--eval.n_samples=2", "--eval.seq_len=32"]
    for fmt in ("compressed-tensors", "compressed-tensors-asym"):
        got = {}
        for mode in ("torch", "triton"):
            out = tmp_path / f"{fmt}-{mode}"
            rc = main(["eval", str(rtn_exports[fmt]), f"--eval.path={texts['eval']}", *args,
                       f"--kernels.mode={mode}", f"--output={out}", "--quiet"])
            assert rc == 0, capsys.readouterr().err
            got[mode] = json.loads((out / "eval.json").read_text())
        assert got["triton"]["kernels"] == {"mode": "triton", "ran": {"w4a16_matmul": "triton"}}, fmt
        assert got["torch"]["kernels"] == {"mode": "torch", "ran": {}}, fmt  # dequantized at load: no kernel
        assert got["triton"]["ppl"] == pytest.approx(got["torch"]["ppl"], rel=1e-4), fmt
    capsys.readouterr()
    # every quantized linear of a block is kept packed, the stored tensors as they are; the
    # skeleton keeps its nn.Linear; GPTQ's layout (no kernel) is still dequantized
    src, gptq = ModelSource(rtn_exports["compressed-tensors-asym"], packed=True), ModelSource(rtn_exports["gptq"], packed=True)
    with select.using("triton"):
        block, dense = src.block(1, packed_kernels=True), gptq.block(1, packed_kernels=True)
    stored = src.read_tensors([f"model.layers.1.mlp.down_proj.{s}" for s in ("weight_packed", "weight_zero_point")])
    down = block.get_submodule("mlp.down_proj")
    assert isinstance(down, PackedLinear) and down.weight_zero_point is not None and down.group_size == 32
    assert down.weight_packed.equal(stored["model.layers.1.mlp.down_proj.weight_packed"])
    assert all(isinstance(block.get_submodule(n), PackedLinear) for n in src.block_linears(1))
    assert all(type(dense.get_submodule(n)) is torch.nn.Linear for n in gptq.block_linears(1))
    assert type(src.skeleton.get_submodule("model.layers.1.mlp.down_proj")) is torch.nn.Linear
    select.take_ran()


def test_eval_of_a_run_directory_and_bad_targets(rtn_exports, texts, tmp_path, capsys):
    """A run directory stands for its model/; a directory that is no checkpoint, or a packed
    checkpoint with a tensor missing, is one line and exit 2."""
    result = _eval(rtn_exports["root"] / "gptq", texts, tmp_path / "run", capsys)
    assert result["model"] == str(rtn_exports["gptq"]) and math.isfinite(result["ppl"])
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), f"--eval.path={texts['eval']}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no config.json" in err[0]
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(rtn_exports["awq"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = next(n for n in index["weight_map"] if n.endswith("self_attn.q_proj.qweight"))
    del index["weight_map"][victim]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["eval", str(broken), f"--eval.path={texts['eval']}", f"--output={tmp_path / 'o'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and victim.removesuffix(".qweight") in err[0], err
    other = tmp_path / "marlin"
    shutil.copytree(rtn_exports["compressed-tensors"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["format"] = cfg["quantization_config"]["config_groups"]["group_0"]["format"] = "marlin-24"
    (other / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(other), f"--eval.path={texts['eval']}", f"--output={tmp_path / 'o2'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shardquant: error: model.path: '{other / 'config.json'}': quantization_config.config_groups.group_0: "
                   "format 'marlin-24' is not read (readable: float-quantized, int-quantized, mxfp4-pack-quantized, "
                   "naive-quantized, nvfp4-pack-quantized, pack-quantized)"]
    assert not (tmp_path / "o2").exists()


LLMC_SCRIPT = """
import json, sys
import torch
args = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
torch.manual_seed(0)
ids = args["calib"]
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
weights = {"num_bits": 4, "type": "int", "symmetric": args["sym"], "strategy": "group", "group_size": 32}
recipe = GPTQModifier(ignore=["lm_head"], config_groups={"g": {"targets": ["Linear"], "weights": weights}})
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids),
        shuffle_calibration_samples=False)
model.save_pretrained(args["out"], save_compressed=True)
AutoTokenizer.from_pretrained(args["model"]).save_pretrained(args["out"])
"""


@pytest.mark.slow
def test_llm_compressor_checkpoint_evaluates_as_transformers_loads_it(rtn_exports, texts, tmp_path, capsys):
    """llm-compressor's own GPTQ output (pack-quantized, symmetric, made in the peers' venv),
    read block by block, gives the perplexity of transformers' own (compressed-tensors) load of
    it. (Its asymmetric output does not load in transformers 5.24 + compressed-tensors 0.20: the
    packed zero point's shape is refused, so there is no reference to compare with.)"""
    import os
    import subprocess
    from pathlib import Path

    python = Path(os.environ.get("SHARDQUANT_PEERS", Path.home() / ".cache/shardquant/peers")) / "llmcompressor/bin/python"
    if not python.is_file():
        pytest.skip(f"no llm-compressor venv at {python} (benchmarks/peers.py builds it)")
    windows = eval_windows(rtn_exports["model"], texts, n=4, seq_len=64)
    out = tmp_path / "llmc"
    args = {"model": str(rtn_exports["model"]), "out": str(out), "calib": windows[:2, :32].tolist(), "sym": True}
    (tmp_path / "run.py").write_text(LLMC_SCRIPT)
    proc = subprocess.run([str(python), str(tmp_path / "run.py"), json.dumps(args)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    ours = _eval(out, texts, tmp_path / "eval", capsys)
    assert ours["format"] == "compressed-tensors"
    assert ours["ppl"] == pytest.approx(reference_ppl(out, windows), rel=1e-4)


def test_eval_tasks_of_a_packed_checkpoint_equal_hflm_on_its_fake_export(rtn_exports, texts, local_tasks,
                                                                         hflm_reference, tmp_path, capsys):
    from task_fixtures import TASKS, assert_same_as_hflm

    rc = main(["eval", str(rtn_exports["gptq"]), "--eval.tasks=[tiny_mc, tiny_rolling]",
               f"--eval.task_paths=[{local_tasks}]", f"--eval.task_max_length={TASKS['task_max_length']}",
               "--eval.batch_size=4", f"--output={tmp_path}", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "tiny_mc: acc" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["ppl"] is None  # no eval.path: tasks only
    samples = json.loads((tmp_path / "task_samples.json").read_text())["model"]
    assert_same_as_hflm((result["tasks"], samples), hflm_reference(rtn_exports["fake"]))


@pytest.mark.parametrize(("fmt", "sym", "act_order"), [
    ("compressed-tensors", True, False), ("compressed-tensors", False, False), ("gptq", True, False),
    ("gptq", True, True), ("awq", True, False), ("awq", False, False),
])
def test_each_reader_undoes_its_exporter(rtn_exports, fmt, sym, act_order):
    """Random codes, fp16 scales, zeros and (act-order) a permuted g_idx, written by the format's
    exporter, read back by `model.packed` as `QuantizedWeight.dequantize` computes them."""
    from shardquant.algorithms.quantizer import QuantizedWeight, QuantSpec
    from shardquant.config import QuantConfig
    from shardquant.export.registry import get_exporter
    from shardquant.model.packed import READERS
    from shardquant.model.source import ModelSource

    g = torch.Generator().manual_seed(3)
    out_f, in_f, group = 128, 64, 32
    q = QuantConfig(method="gptq", bits=4, group_size=group, symmetric=sym, act_order=act_order)
    exporter = get_exporter(fmt, ModelSource(rtn_exports["model"]), q)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    zeros = torch.full((out_f, in_f // group), 8, dtype=torch.int32) if sym else \
        torch.randint(0, 16, (out_f, in_f // group), generator=g, dtype=torch.int32)
    qw = QuantizedWeight(
        codes=torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
        scales=(torch.rand(out_f, in_f // group, generator=g) * 0.1 + 1e-3).half().float(),
        zeros=zeros, g_idx=g_idx, spec=QuantSpec(4, group, sym),
    )
    tensors = exporter.linear_tensors("x", qw)
    qc = exporter.config_json()["quantization_config"]
    got = READERS[fmt]({k.removeprefix("x."): v for k, v in tensors.items()}, qc)
    torch.testing.assert_close(got, qw.dequantize(), rtol=0, atol=0)
