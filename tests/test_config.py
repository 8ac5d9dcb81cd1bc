"""Config loading, validation and the two override forms a W&B agent and a person use."""

from __future__ import annotations

import pytest
import yaml

from shardquant.config import build_config, load_config, parse_overrides, parse_size
from shardquant.errors import UserError

BASE = {"model": {"path": "m"}, "calib": {"path": "c.txt"}}


def write(tmp_path, data) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_and_resolution(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.quant.method == "gptq" and cfg.quant.bits == 4 and cfg.quant.group_size == 128
    assert cfg.calib.propagate == "quantized"
    assert cfg.quant.ignore == ["lm_head"]
    assert cfg.tracking.wandb.mode == "disabled"
    assert cfg.cluster.backend == "local"
    q = cfg.quant  # the measured GPTQ defaults (benchmarks/RESULTS.md): act-order with static groups
    assert (q.act_order, q.static_groups, q.reorder, q.damp) == (True, True, "none", 0.01)


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ({"reorder": "group"}, (False, False, "group")),  # explicit GAR: the act-order defaults yield
        ({"act_order": False}, (False, False, "none")),  # plain GPTQ: static follows act-order
        ({"act_order": False, "static_groups": True}, (False, True, "none")),
        ({"reorder": "group", "static_groups": True}, (False, True, "group")),
    ],
)
def test_reorder_defaults_resolve(tmp_path, quant, expected):
    q = load_config(write(tmp_path, {**BASE, "quant": quant})).quant
    assert (q.act_order, q.static_groups, q.reorder) == expected


def test_reorder_and_act_order_both_set_is_an_error(tmp_path):
    with pytest.raises(UserError, match="exclude each other"):
        load_config(write(tmp_path, {**BASE, "quant": {"reorder": "group", "act_order": True}}))


@pytest.mark.parametrize(
    "args",
    [
        ["--quant.bits=3", "--quant.group_size=64", "--calib.propagate=fp", "--quant.symmetric=false"],
        ["--quant.bits", "3", "--quant.group_size", "64", "--calib.propagate", "fp", "--quant.symmetric", "false"],
    ],
)
def test_overrides_both_forms(tmp_path, args):
    cfg = load_config(write(tmp_path, BASE), args)
    assert cfg.quant.bits == 3
    assert cfg.quant.group_size == 64
    assert cfg.calib.propagate == "fp"
    assert cfg.quant.symmetric is False


def test_override_lists_and_strings(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["--quant.ignore=[lm_head, down_proj]", "--output=runs/x"])
    assert cfg.quant.ignore == ["lm_head", "down_proj"]
    assert cfg.output == "runs/x"


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--quant.bitz=3"], r"unknown config key 'quant\.bitz'"),
        (["--nope.x=1"], r"unknown config key 'nope'"),
        (["--quant.bits=four"], r"^quant\.bits: .*'four'"),
        (["--quant.bits=9"], r"^quant\.bits: must be between 2 and 8, got 9"),
        (["--quant.bits=1"], r"^quant\.bits: must be between 2 and 8"),
        (["--quant.group_size=0"], r"^quant\.group_size: must be -1"),
        (["--calib.propagate=sideways"], r"^calib\.propagate: .*'sideways'"),
        (["--calib.n_samples=0"], r"^calib\.n_samples: "),
        (["--export.shard_size=lots"], r"^export\.shard_size: "),
        (["--quant.bits"], r"override '--quant\.bits' has no value"),
        (["quant.bits=3"], r"unexpected argument 'quant\.bits=3'"),
        (["--quant.bits.x=3"], r"^quant\.bits: "),
        (["--model.path.x=3"], r"'model\.path' is not a section"),
        (["--cluster.backend=slurm"], r"^cluster\.backend: "),
        (["--cluster.workers=0"], r"^cluster\.workers: "),
        (["--cluster.activation_memory=lots"], r"^cluster\.activation_memory: "),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, args, pattern):
    with pytest.raises(UserError, match=pattern) as err:
        load_config(write(tmp_path, BASE), args)
    assert "\n" not in str(err.value)


def test_missing_required_key():
    with pytest.raises(UserError, match=r"missing required config key 'model'"):
        build_config({"calib": {"path": "x"}})


def test_bad_yaml_files(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML at line"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match=r"must hold a mapping"):
        load_config(p)
    with pytest.raises(UserError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_overrides_and_sizes():
    assert parse_overrides(["--a.b=1", "--c", "x y"]) == {"a.b": 1, "c": "x y"}
    assert parse_overrides(["--a=1.5e-2"]) == {"a": 0.015}
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("-1GB")


def test_export_format_default_is_compressed_tensors():
    """Packed by default; `fake` when nothing is quantized unless a format is asked for."""
    base = {"model": {"path": "m"}}
    assert build_config(base).export.format == "compressed-tensors"
    assert build_config(base, {"quant.method": "none"}).export.format == "fake"
    assert build_config(base, {"quant.method": "none", "export.format": "gptq"}).export.format == "gptq"
    for fmt in ("compressed-tensors", "gptq", "awq", "fake"):
        assert build_config(base, {"export.format": fmt}).export.format == fmt
    with pytest.raises(UserError, match=r"^export\.format: "):
        build_config(base, {"export.format": "exl2"})
