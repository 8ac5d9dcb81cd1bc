"""`shardquant plan`: numbers worked out by hand for Llama-2-70B and Llama-3.1-405B, the CLI,
and agreement with real runs of tiny models (activation bytes, checkpoint bytes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import FAMILIES, run_config

from shardquant.cli import main
from shardquant.config import build_config
from shardquant.tools.plan import packed_linear_bytes, plan_from_config

LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}
LLAMA31_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
    "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
}
GiB = 2**30


def model_dir(tmp_path, config: dict, name: str = "model"):
    """A model directory holding only config.json (all that planning reads)."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def config_70b(tmp_path, **sections) -> dict:
    cfg = {
        "model": {"path": str(model_dir(tmp_path, LLAMA2_70B)), "dtype": "bfloat16"},
        "calib": {"path": "calib.txt", "n_samples": 128, "seq_len": 2048, "batch_size": 8},
        "eval": {"path": "wiki.txt", "n_samples": 32, "seq_len": 2048, "batch_size": 8},
        "quant": {"method": "gptq", "bits": 4, "group_size": 128},
        "export": {"format": "compressed-tensors"},
        "cluster": {"backend": "ray", "workers": 8},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


# Llama-2-70B linears (out, in): q/o 8192×8192, k/v 1024×8192 (8 kv heads × head_dim 128),
# gate/up 28672×8192, down 8192×28672.
L70 = {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192), "o": (8192, 8192),
       "gate": (28672, 8192), "up": (28672, 8192), "down": (8192, 28672)}


def test_llama2_70b_by_hand(tmp_path):
    plan = plan_from_config(build_config(config_70b(tmp_path)))
    # 128 windows over 8 workers: 16 each; 32 evaluation windows: 4 each.
    assert plan.calib_windows == [16] * 8 and plan.eval_windows == [4] * 8
    # Activation bytes per worker, per stream: windows × seq_len × hidden × 2 (bf16).
    assert plan.streams == {
        "calib": 16 * 2048 * 8192 * 2,  # 512 MiB
        "eval_q": 4 * 2048 * 8192 * 2,
        "eval_fp": 4 * 2048 * 8192 * 2,
    }
    assert plan.streams["calib"] == 512 * 2**20
    # One block in bf16: 2·8192² (q, o) + 2·1024·8192 (k, v) + 3·28672·8192 (mlp) + 2·8192 (norms).
    block = (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192) * 2
    assert plan.block_bytes == block == 1_711_308_800
    # The widest input group is down_proj's (28672 inputs): its fp32 Hessian is 28672² × 4.
    assert plan.hessian_group == "mlp_out" and plan.hessian_in == 28672
    assert plan.hessian_bytes == 28672 * 28672 * 4 == 3_288_334_336
    m = plan.memory
    assert m["weights"] == block
    assert m["activations"] == (16 + 4 + 4) * 2048 * 8192 * 2
    # Every linear's uint8 codes, fp32 scales + int32 zeros per group of 128, int32 g_idx.
    assert m["solved_codes"] == sum(o * i + o * (i // 128) * 8 + i * 4 for o, i in L70.values())
    # Who solves what (execution.packing, as the Ray executor packs): a unit costs rows·in² +
    # in³; a GPTQ linear is split in k = ceil(out·in² / (phase cost / 8)) row slices. down_proj
    # alone: k = ceil(8·8192 / (8192 + 28672)) = 2 halves of 4096 rows, on ranks 0 and 1;
    # gate/up: k = ceil(3.5 / 1.125) = 4 slices of 7168 rows each, one on every rank.
    # Rank 0's widest unit, down_proj's half (4096·28672 elements), in fp32, twice.
    assert m["fp32_copies"] == 2 * 4096 * 28672 * 4
    # CPU workers: every worker's part is copied into the object store when returned, and the
    # solver maps all 8 parts from the store beside a new running sum and one work matrix.
    assert m["hessians"] == (8 + 1 + 1) * 28672 * 28672 * 4
    assert m["awq_captures"] == 0
    # Kept between true-sequential passes: 16·2048 tokens × (attention output 8192 + down_proj's
    # input 28672) in bf16.
    assert m["stage_cache"] == 16 * 2048 * (8192 + 28672) * 2
    # Forward workspace, B=8, T=2048: fp32 attention scores 8·64·2048²·4 (8 GiB) beat the MLP's
    # 2·8·2048·28672·2; plus the batch being produced 8·2048·8192·2.
    assert m["workspace"] == 8 * 64 * 2048 * 2048 * 4 + 8 * 2048 * 8192 * 2
    # The previous block's export, written in the background (CPU workers): per linear int32
    # codes 8 to a word (out·in/2 B), bf16 scales per group of 128 and its int64[2] shape; the
    # two bf16 norms.
    assert m["block_writing"] == sum(o * i // 2 + o * (i // 128) * 2 + 16 for o, i in L70.values()) + 2 * 8192 * 2
    # A Ray actor's own footprint (0.55 GiB); a forward batch never coexists with a solve.
    assert m["framework"] == 563 * 2**20
    held = sum(m[k] for k in ("framework", "weights", "activations", "solved_codes", "awq_captures", "stage_cache",
                              "block_writing"))
    assert m["block_phase"] == held + max(m["workspace"], m["fp32_copies"] + m["hessians"])
    # Outside the blocks: activations + the lm_head 32000·8192·2 + one window's fp32 logits, twice.
    assert m["outside_phase"] == m["framework"] + m["activations"] + 32000 * 8192 * 2 + 2 * 2048 * 32000 * 4
    assert m["peak"] == m["block_phase"] == plan.worker_peaks[0] == plan.worker_peaks[1]
    # Rank 2 solves no part of down_proj: it holds its own part, its copy in the store and the
    # serializer's transient; its widest unit is a gate slice (7168·8192). That solve is larger
    # than a forward batch.
    solve_2 = 2 * 7168 * 8192 * 4 + 3 * 28672 * 28672 * 4
    assert solve_2 > m["workspace"] and plan.worker_peaks[2] == held + solve_2
    assert plan.driver == 461 * 2**20  # GPTQ: the driver's measured footprint alone
    # compressed-tensors 4-bit g128, symmetric: int32 codes o·i/8·4, bf16 scales o·(i/128)·2,
    # int64[2] shape; norms, embedding, final norm and lm_head in bf16.
    per_block = sum(o * (i // 8) * 4 + o * (i // 128) * 2 + 16 for o, i in L70.values()) + 2 * 8192 * 2
    ckpt = 80 * per_block + (32000 * 8192 * 2) * 2 + 8192 * 2
    assert plan.checkpoint_bytes == ckpt
    assert 33 * GiB < ckpt < 35 * GiB  # about 4.1 bits per weight over 69B weights + fp embeddings
    assert plan.verdict(80 * 10**9) == {"bytes": 80 * 10**9, "fits": True, "margin": 80 * 10**9 - m["peak"]}
    assert not plan.verdict(m["peak"] - 1)["fits"] and plan.verdict(m["peak"])["fits"]


def test_llama2_70b_awq_counts_its_gram_matrices(tmp_path):
    """awq on GPU workers keeps each group's accumulator for exact output errors: the worker's
    own part for its search (let go before the solve), then the running sum (the parts come
    from the host's object store one at a time), plus one Gram matrix of the widest group; AWQ
    linears are solved whole, a chunk of rows at a time; and the unscaled weights of the group
    being solved, in bf16 (gate + up)."""
    cfg = build_config(config_70b(tmp_path, quant={"method": "awq"}, export={"format": "awq"}))
    plan = plan_from_config(cfg, device="cuda")
    assert plan.hessian_group == "mlp_out" and plan.memory["hessians"] == (1 + 1) * 28672 * 28672 * 4
    # down_proj (28672·8192 elements) a chunk of 2^24 at a time: 8 chunk-sized temporaries and
    # the chunks' codes with their concatenation (half the weight); gate + up unscaled in bf16.
    assert plan.memory["fp32_copies"] == (8 * 2**24 + 28672 * 8192 // 2) * 4 + 2 * 28672 * 8192 * 2
    # The same run on CPU workers: rank 0 solves down_proj from all 8 parts mapped from the
    # store, beside the running sum and the Gram matrix.
    assert plan_from_config(cfg, device="cpu").memory["hessians"] == (8 + 1 + 1) * 28672 * 28672 * 4
    # The driver gathers the clip search's 512 rows of down_proj's 28672 inputs in fp32 and
    # sends them with every solve call: 8 copies at its peak.
    assert plan.driver == 461 * 2**20 + 8 * 512 * 28672 * 4


def test_llama2_70b_fake_and_rtn(tmp_path):
    """quant.method rtn: no Hessians; fake export: every tensor in bf16 (the unquantized size)."""
    plan = plan_from_config(build_config(config_70b(tmp_path, quant={"method": "rtn"}, export={"format": "fake"})))
    assert plan.hessian_group is None and plan.memory["hessians"] == 0
    params = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192) + 2 * 32000 * 8192 + 8192
    assert params == 68_976_648_192  # Llama-2-70B's parameter count
    assert plan.checkpoint_bytes == params * 2


def test_llama31_405b_by_hand(tmp_path):
    """awq+gptq, propagate fp, 130 windows over 16 workers, activations capped, no evaluation,
    AWQ export."""
    cfg = build_config({
        "model": {"path": str(model_dir(tmp_path, LLAMA31_405B)), "dtype": "bfloat16"},
        "calib": {"path": "c.txt", "n_samples": 130, "seq_len": 2048, "batch_size": 8, "propagate": "fp"},
        "quant": {"method": "awq+gptq", "bits": 4, "group_size": 128},
        "export": {"format": "awq"},
        "cluster": {"backend": "ray", "workers": 16, "activation_memory": "1GB"},
    })
    plan = plan_from_config(cfg)
    # propagate fp on Ray: pipeline stages, every worker holds all 130 windows and 126/16 ->
    # 8 blocks (plan.split_range: the first 14 stages get 8, the last two 7).
    assert plan.calib_windows == [130] * 16
    assert plan.eval_windows == [0] * 16
    assert any("pipeline stages" in n and "8 blocks" in n for n in plan.notes)
    stream = 130 * 2048 * 16384 * 2  # 8.1 GiB
    assert plan.streams == {"calib": stream, "calib_next": stream}
    assert plan.resident == 10**9 and plan.spilled == 2 * stream - 10**9
    assert plan.hessian_in == 53248 and plan.hessian_bytes == 53248 * 53248 * 4  # 10.56 GiB
    lin = {"q": (16384, 16384), "k": (1024, 16384), "v": (1024, 16384), "o": (16384, 16384),
           "gate": (53248, 16384), "up": (53248, 16384), "down": (16384, 53248)}
    params = sum(o * i for o, i in lin.values())
    assert plan.block_bytes == (params + 2 * 16384) * 2
    m = plan.memory
    assert m["hessians"] == (1 + 1) * 53248 * 53248 * 4
    # down_proj's captured inputs (130·2048 tokens × 53248) and the consumer's outputs (× 16384).
    assert m["awq_captures"] == 130 * 2048 * (53248 + 16384) * 2
    assert m["stage_cache"] == 130 * 2048 * (16384 + 53248) * 2
    # The widest linear twice in fp32, and gate + up (the largest group) unscaled in bf16.
    assert m["fp32_copies"] == 2 * 53248 * 16384 * 4 + 2 * 53248 * 16384 * 2
    assert m["workspace"] == 8 * 128 * 2048 * 2048 * 4 + 8 * 2048 * 16384 * 2
    assert m["activations"] == 10**9
    # 130 windows on every stage: their AWQ captures and stage cache alone are 2 × 34.7 GiB.
    assert m["peak"] == m["block_phase"] > 90 * GiB
    assert not plan.verdict(80 * 10**9)["fits"]
    # AWQ GEMM: int32 qweight i·(o/8)·4, qzeros (i/128)·(o/8)·4, fp16 scales (i/128)·o·2.
    per_block = sum(i * (o // 8) * 4 + (i // 128) * (o // 8) * 4 + (i // 128) * o * 2 for o, i in lin.values())
    per_block += 2 * 16384 * 2
    assert plan.checkpoint_bytes == 126 * per_block + 2 * 128256 * 16384 * 2 + 16384 * 2


def test_packed_linear_bytes_by_format(tmp_path):
    """70B's down_proj (out 8192, in 28672, 224 groups of 128) in every format."""
    base = config_70b(tmp_path)
    o, i, g = 8192, 28672, 224

    def size(fmt, **quant):
        cfg = build_config({**base, "quant": {**base["quant"], **quant}, "export": {"format": fmt}})
        return packed_linear_bytes(fmt, o, i, cfg)

    assert size("fake") == o * i * 2
    assert size("compressed-tensors") == o * (i // 8) * 4 + o * g * 2 + 16
    assert size("compressed-tensors", symmetric=False) == o * (i // 8) * 4 + o * g * 2 + 16 + (o // 8) * g * 4
    assert size("compressed-tensors", group_size=-1) == o * (i // 8) * 4 + o * 1 * 2 + 16
    assert size("compressed-tensors", bits=8) == o * (i // 4) * 4 + o * g * 2 + 16
    assert size("gptq") == i * 4 + (i // 8) * o * 4 + g * (o // 8) * 4 + g * o * 2
    assert size("awq") == i * (o // 8) * 4 + g * (o // 8) * 4 + g * o * 2


def test_ignored_linears_stay_in_dtype(tmp_path):
    cfg = config_70b(tmp_path, quant={"ignore": ["lm_head", "down_proj"]})
    plan = plan_from_config(build_config(cfg))
    # down_proj stays bf16 in every block; the widest Hessian is now gate/up's (8192 inputs).
    full = plan_from_config(build_config(config_70b(tmp_path)))
    ct_down = 8192 * (28672 // 8) * 4 + 8192 * 224 * 2 + 16
    assert plan.checkpoint_bytes - full.checkpoint_bytes == 80 * (8192 * 28672 * 2 - ct_down)
    assert plan.hessian_in == 8192 and plan.hessian_group == "attn_in"


# --- the command line --------------------------------------------------------------------


def write_yaml(tmp_path, cfg: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_text(tmp_path, capsys):
    path = write_yaml(tmp_path, config_70b(tmp_path))
    assert main(["plan", str(path), "--worker-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    plan = plan_from_config(build_config(yaml.safe_load(path.read_text())))
    assert "llama, 80 blocks, hidden 8192" in out
    assert "calibration windows  16 of 128" in out
    assert f"({16 * 2048 * 8192 * 2} B)" in out
    assert "largest Hessian          3.06 GiB  (mlp_out: 28672×28672 fp32)" in out
    assert f"({plan.peak} B)" in out
    assert f"({plan.checkpoint_bytes} B of tensors, compressed-tensors)" in out
    assert ": FITS, margin" in out and f"({80 * 10**9 - plan.peak} B)" in out
    # Overrides work like everywhere else. With 32 windows a worker the stage cache would not
    # fit 40 GiB: auto turns it off, and says so.
    assert main(["plan", str(path), "--worker-memory=40GiB", "--calib.n_samples=256"]) == 0
    out = capsys.readouterr().out
    assert "calibration windows  32 of 256" in out and ": FITS, margin" in out
    assert "auto: calib.reuse_stages auto: off, the stage cache (4831838208 B)" in out
    assert "stage_cache" not in out.split("peak memory per worker")[1]
    # Ranks 0 and 1 solve down_proj's halves; the others hold only their own part.
    assert "by rank (who solves what differs)  0: 36.15 GiB, 1: 36.15 GiB, 2: 14.28 GiB" in out
    assert "driver process         461.00 MiB" in out
    # A smaller worker does not fit and the exit is still 0. On CPU workers the solver's
    # Hessians (all 8 parts mapped from the object store) dominate: no single change is
    # enough, and plan says so.
    assert main(["plan", str(path), "--worker-memory=16GiB"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT, short by" in out and "to fit: no single change" in out


def test_cli_json(tmp_path, capsys):
    path = write_yaml(tmp_path, config_70b(tmp_path))
    assert main(["plan", str(path), "--json", "--worker-memory", "80GB", "--cluster.activation_memory=600MB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["blocks"] == 80 and data["run"]["workers"] == 8
    assert data["samples"]["calib"]["per_worker"] == [16] * 8
    assert data["activations"]["streams"]["calib"] == 16 * 2048 * 8192 * 2
    assert data["activations"]["total"] == 24 * 2048 * 8192 * 2
    assert data["activations"]["resident"] == 600 * 10**6
    assert data["activations"]["spilled"] == 24 * 2048 * 8192 * 2 - 600 * 10**6
    assert data["block_bytes"] == 1_711_308_800
    assert data["hessian"] == {"group": "mlp_out", "in_features": 28672, "bytes": 28672 * 28672 * 4}
    assert data["capacity"]["fits"] is True
    assert data["capacity"]["margin"] == 80 * 10**9 - data["memory"]["peak"]
    assert data["memory"]["activations"] == 600 * 10**6


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('["a"]', "must hold a JSON object"),
        ('{"model_type": "gpt2"}', "architecture 'gpt2' is not supported"),
        ('{"model_type": "llama", "hidden_size": 8192}', "config.json: 'num_attention_heads' is missing"),
        ('{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": "3"}',
         "'num_hidden_layers' must be a positive integer (got '3')"),
    ],
)
def test_cli_bad_model_config(tmp_path, capsys, content, message):
    model = tmp_path / "m"
    model.mkdir()
    if content is not None:
        (model / "config.json").write_text(content)
    path = write_yaml(tmp_path, {"model": {"path": str(model)}})
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("shardquant: error: ")


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = write_yaml(tmp_path, config_70b(tmp_path))
    assert main(["plan", str(path), "--worker-memory", "lots"]) == 2
    assert "--worker-memory" in capsys.readouterr().err


def test_plan_imports_no_torch(tmp_path):
    """`shardquant plan` stays fast: torch (and transformers) are never imported."""
    path = write_yaml(tmp_path, config_70b(tmp_path))
    code = (
        "import sys; from shardquant.cli import main; rc = main(['plan', sys.argv[1], '--json']); "
        "assert rc == 0; heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, timeout=120)


# --- against real runs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_run(tiny_models, texts, tmp_path_factory):
    """A real local gptq run of the tiny llama exported as fake, and its config."""
    from shardquant.pipeline import quantize

    out = tmp_path_factory.mktemp("plan-run") / "out"
    cfg = build_config(run_config(tiny_models["llama"], texts, out, export={"format": "fake"}))
    return cfg, quantize(cfg, show_progress=False)


def test_activation_bytes_match_a_real_run(fake_run, one_thread):
    cfg, report = fake_run
    plan = plan_from_config(cfg)
    # The local run's one worker holds the whole calibration stream: 16 × 64 × 64 × 4 (fp32).
    assert plan.streams["calib"] == 16 * 64 * 64 * 4
    assert report["blocks"][0]["activation_bytes"] == plan.streams["calib"]
    assert all(b["activation_bytes"] == plan.streams["calib"] for b in report["blocks"])
    assert report["export"]["bytes"] == plan.checkpoint_bytes


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_checkpoint_bytes_match_a_real_export(fmt, tiny_models, texts, tmp_path, one_thread):
    from shardquant.pipeline import quantize

    cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / "out", quant={"method": "rtn"},
                                  export={"format": fmt}))
    report = quantize(cfg, show_progress=False)
    assert report["export"]["bytes"] == plan_from_config(cfg).checkpoint_bytes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt,quant", [
    ("fake", {}), ("compressed-tensors", {}), ("compressed-tensors", {"symmetric": False, "bits": 2}),
    ("compressed-tensors", {"group_size": -1, "ignore": ["lm_head", "o_proj"]}), ("gptq", {"bits": 8}),
    ("awq", {}),
])
def test_checkpoint_bytes_match_the_exporters_plan(family, fmt, quant, tiny_models, texts, tmp_path):
    """Every family (qwen2's q/k/v biases, qwen3's q/k norms) and scheme: the plan's size equals
    the sum of the exporter's planned tensors (what a real export writes)."""
    from shardquant.export.registry import get_exporter
    from shardquant.model.source import ModelSource

    cfg = build_config(run_config(tiny_models[family], texts, tmp_path / "out", quant=quant,
                                  export={"format": fmt}))
    source = ModelSource(cfg.model.path, dtype=cfg.model.dtype, device="cpu")
    specs = get_exporter(fmt, source, cfg.quant).plan()
    assert plan_from_config(cfg).checkpoint_bytes == sum(s.nbytes for s in specs)


def test_readme_example_is_current(tmp_path):
    """The README's 70B example prints what `shardquant plan` prints for its YAML."""
    import re
    from pathlib import Path

    from shardquant.tools.plan_text import parse_capacity, render

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Sizing a run: shardquant plan", 1)[1]
    yaml_text, shown = re.findall(r"```(?:yaml)?\n(.*?)```", section, re.S)[:2]
    data = yaml.safe_load(yaml_text)
    shown_path = data["model"]["path"]
    data["model"]["path"] = str(model_dir(tmp_path, LLAMA2_70B))
    out = render(plan_from_config(build_config(data)), parse_capacity("80GB"))
    expected = shown.split("\n", 1)[1]  # without the "$ shardquant plan ..." line
    assert out.replace(data["model"]["path"], shown_path) + "\n" == expected


def test_awq_row_chunk_is_the_algorithms():
    """The plan's AWQ chunk (torch-free) is the one algorithms.awq works in."""
    from shardquant.algorithms import awq
    from shardquant.tools.plan import AWQ_ROW_CHUNK

    assert AWQ_ROW_CHUNK == awq.ROW_CHUNK_ELEMENTS


def test_spill_traffic_by_hand(tmp_path, capsys):
    """Llama-2-70B on 8 workers, activations capped at 600 MB: rank 0's streams are calib
    16·2048·8192·2 = 512 MiB (in memory first), eval_q and eval_fp 4·2048·8192·2 = 128 MiB each;
    what is left of the cap holds part of eval_q, the rest spills. GPTQ true-sequential has 4
    observation passes per block (q/k/v, o, gate/up, down)."""
    calib, ev = 16 * 2048 * 8192 * 2, 4 * 2048 * 8192 * 2
    cap = 600 * 10**6
    s_q = ev - (cap - calib)  # eval_q past the cap
    s_fp = ev
    # Per block: each spilled evaluation byte is read by its pass and by the checkpoint, and
    # written once; nothing of calib spills, so the 4 observation passes read nothing.
    reads, writes = 2 * (s_q + s_fp), s_q + s_fp
    path = write_yaml(tmp_path, config_70b(tmp_path, cluster={"activation_memory": "600MB"}))
    assert main(["plan", str(path), "--json", "--disk-throughput=1GB"]) == 0
    got = json.loads(capsys.readouterr().out)["activations"]["spill"]
    assert got == {
        "mode": "auto", "block_read_bytes": reads, "block_written_bytes": writes,
        "run_read_bytes": 80 * reads, "run_written_bytes": 81 * writes,  # + the first write at setup
        "throughput_bytes_per_s": 10**9, "seconds": (80 * reads + 81 * writes) / 10**9,
    }
    assert main(["plan", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "spill traffic" in x)
    seconds = (80 * reads + 81 * writes) / (2 * 10**9)  # the default: 2 GB/s
    assert f"{seconds:.1f} s at 2.00 GB/s" in line and "cluster.spill auto" in line
    # A cap below the calibration stream: its spilled bytes are also read by the 4 passes.
    cfg = build_config(config_70b(tmp_path, cluster={"activation_memory": "256MiB"}))
    plan = plan_from_config(cfg)
    s_c = calib - 256 * 2**20
    assert plan.spill["block_read_bytes"] == (4 + 2) * s_c + 2 * 2 * ev
    assert plan.spill["block_written_bytes"] == s_c + 2 * ev
    assert main(["plan", str(path), "--disk-throughput=fast"]) == 2
    assert "--disk-throughput: 'fast' is not a size" in capsys.readouterr().err
    no_cap = build_config(config_70b(tmp_path))
    assert plan_from_config(no_cap).spill_json() is None


def test_spill_none_over_the_cap_is_a_note_in_plan_and_refused_by_a_run(tmp_path, capsys):
    path = write_yaml(tmp_path, config_70b(tmp_path, cluster={"activation_memory": "600MB", "spill": "none"}))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("note: cluster.spill none: the activations per worker (805306368 B) exceed cluster.activation_memory "
            "(600000000 B); raise it, or let them spill (cluster.spill: auto)") in out
