"""Bad input: each case exits 2 with one clear line and leaves no partial checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_config

from shardquant.cli import main


def run_cli(tmp_path: Path, cfg: dict, capsys, *extra: str) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["quantize", str(path), "--quiet", *extra])
    err = capsys.readouterr().err
    return code, err


def assert_clean_failure(code: int, err: str, pattern: str, output: Path) -> None:
    import re

    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("shardquant: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not (output / "model").exists()
    assert not (output / ".model.partial").exists()
    assert not (output / "report.json").exists()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_model_dir(tmp_path, texts, capsys):
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(tmp_path / "nope", texts, out), capsys)
    assert_clean_failure(code, err, r"model\.path: model directory '.*nope' does not exist", out)


def test_config_without_weights(tmp_path, texts, tiny_models, capsys):
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["qwen2"] / f, d / f)
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(code, err, r"model\.path: .* has config\.json but no \*\.safetensors weights", out)


def test_truncated_safetensors(tmp_path, texts, tiny_models, capsys):
    d = copy_model(tiny_models["qwen2"], tmp_path / "m")
    shard = d / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(code, err, r"model\.path: 'model\.safetensors' is truncated: tensor '.*' ends at byte", out)


def test_shard_missing_from_index(tmp_path, texts, tiny_models, capsys):
    d = copy_model(tiny_models["llama"], tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(code, err, rf"model\.path: shard '{victim.name}' named in the index is missing", out)


def test_missing_tokenizer(tmp_path, texts, tiny_models, capsys):
    d = copy_model(tiny_models["qwen2"], tmp_path / "m")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(code, err, r"model\.path: .* has no tokenizer", out)


def test_unsupported_architecture(tmp_path, texts, tiny_models, capsys):
    d = copy_model(tiny_models["qwen2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(
        code, err, r"architecture 'gpt_neox' is not supported \(supported: deepseek_v3, llama, mistral, mixtral, qwen2, "
        r"qwen2_moe, qwen3, qwen3_moe, smollm3\)", out
    )


def test_already_quantized_checkpoint(tmp_path, texts, tiny_models, capsys):
    """A checkpoint whose config.json declares a quantization_config (DeepSeek-V3's own is FP8
    with block scales) is refused before any weight is read: its weights are not floats to
    calibrate, and reading them as such would be silently wrong."""
    d = copy_model(tiny_models["qwen2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(d, texts, out), capsys)
    assert_clean_failure(code, err, r"model\.path: .*config\.json' declares a quantization_config \(fp8\)", out)


def test_empty_calibration_text(tmp_path, texts, tiny_models, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    out = tmp_path / "out"
    cfg = run_config(tiny_models["qwen2"], {**texts, "calib": empty}, out)
    code, err = run_cli(tmp_path, cfg, capsys)
    assert_clean_failure(code, err, r"calib\.path: .*empty\.txt.* holds no text", out)


def test_seq_len_longer_than_text(tmp_path, texts, tiny_models, capsys):
    short = tmp_path / "short.txt"
    short.write_text("The king speaks. The queen answers.")
    out = tmp_path / "out"
    cfg = run_config(tiny_models["qwen2"], {**texts, "calib": short}, out)
    code, err = run_cli(tmp_path, cfg, capsys)
    assert_clean_failure(code, err, r"calib\.seq_len=64 is longer than calib\.path allows", out)


def test_unknown_key(tmp_path, texts, tiny_models, capsys):
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(tiny_models["qwen2"], texts, out), capsys, "--quant.bitz=3")
    assert_clean_failure(code, err, r"unknown config key 'quant\.bitz'", out)


def test_wrong_type(tmp_path, texts, tiny_models, capsys):
    out = tmp_path / "out"
    cfg = run_config(tiny_models["qwen2"], texts, out, calib={"n_samples": "many"})
    code, err = run_cli(tmp_path, cfg, capsys)
    assert_clean_failure(code, err, r"calib\.n_samples: .*'many'", out)


def test_group_size_must_divide(tmp_path, texts, tiny_models, capsys):
    out = tmp_path / "out"
    cfg = run_config(tiny_models["qwen2"], texts, out, quant={"group_size": 48})
    code, err = run_cli(tmp_path, cfg, capsys)
    assert_clean_failure(code, err, r"quant\.group_size=48 does not divide the input size 64 of self_attn\.q_proj", out)


def test_bits_out_of_range(tmp_path, texts, tiny_models, capsys):
    out = tmp_path / "out"
    code, err = run_cli(tmp_path, run_config(tiny_models["qwen2"], texts, out), capsys, "--quant.bits", "12")
    assert_clean_failure(code, err, r"quant\.bits: must be between 2 and 8, got 12", out)


def test_unwritable_output(tmp_path, texts, tiny_models, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    code, err = run_cli(tmp_path, run_config(tiny_models["qwen2"], texts, out), capsys)
    assert_clean_failure(code, err, r"output: cannot write to '.*a-file/run'", out)


def test_real_process_exit_code(tmp_path, texts):
    """The installed entry point, as a user runs it: exit 2 and one line on stderr."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tmp_path / "missing", texts, tmp_path / "out")))
    proc = subprocess.run(
        [sys.executable, "-m", "shardquant", "quantize", str(cfg)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"shardquant: error: model.path: model directory '{tmp_path / 'missing'}' does not exist"
    ]


def test_cli_help_is_light():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, shardquant.cli; shardquant.cli._parser(); "
         "print('torch' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"]])
def test_help_exits_zero(argv):
    proc = subprocess.run([sys.executable, "-m", "shardquant", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "shardquant" in proc.stdout
