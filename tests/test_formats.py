"""Each export format's layout is defined once (`shardquant.export.formats`): the exporter
plans and writes it, `shardquant plan` sizes it, and plan's notes are the exporter's refusals."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import run_config

from shardquant.config import QuantConfig, build_config
from shardquant.errors import UserError
from shardquant.export.formats import LAYOUTS, PACKED
from shardquant.export.registry import EXPORTERS, get_exporter
from shardquant.export.shards import ST_DTYPES
from shardquant.model.source import ModelSource
from shardquant.tools.plan import packed_linear_bytes, plan_from_config

SHAPES = [(64, 64), (32, 128), (256, 96), (8192, 28672)]


def test_every_layout_has_its_exporter():
    assert EXPORTERS.keys() == LAYOUTS.keys()
    assert all(EXPORTERS[name].layout_class is cls for name, cls in LAYOUTS.items())


@pytest.mark.parametrize("fmt", sorted(PACKED))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_sizes_the_exporters_planned_tensors(fmt, dtype, tmp_path):
    """For every scheme the format holds and several shapes, plan's bytes of a packed linear are
    the bytes of the exporter's planned tensors, which are the layout's parts."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    for bits, group, sym in itertools.product((2, 4, 8), (-1, 32, 128), (True, False)):
        quant = {"method": "rtn", "bits": bits, "group_size": group, "symmetric": sym}
        cfg = build_config({"model": {"path": str(tmp_path), "dtype": dtype}, "quant": quant,
                            "export": {"format": fmt}})
        exporter = EXPORTERS[fmt](SimpleNamespace(dtype=torch_dtype), QuantConfig(**quant))
        for out_f, in_f in SHAPES:
            specs = exporter.linear_specs("m", out_f, in_f)
            parts = exporter.layout.parts(out_f, in_f)
            assert [(s.name, ST_DTYPES[s.dtype], s.shape) for s in specs] == [
                (f"m.{p.suffix}", p.dtype, p.shape) for p in parts
            ]
            assert [s.nbytes for s in specs] == [p.nbytes for p in parts]
            assert packed_linear_bytes(fmt, out_f, in_f, cfg) == sum(s.nbytes for s in specs)


@pytest.mark.parametrize("fmt,quant", [
    ("compressed-tensors", {"method": "none"}),
    ("compressed-tensors", {"bits": 3}),
    ("compressed-tensors", {"act_order": True, "static_groups": False}),
    ("gptq", {"bits": 5}),
    ("gptq", {"symmetric": False}),
    ("gptq", {"ignore": ["lm_head", "o_proj"]}),
    ("awq", {"bits": 8}),
    ("awq", {"group_size": -1}),
    ("awq", {"group_size": 48}),
])
def test_plan_notes_are_the_exporters_refusals(fmt, quant, tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["llama"], texts, tmp_path / "out", quant=quant,
                                  export={"format": fmt}))
    source = ModelSource(cfg.model.path, dtype=cfg.model.dtype, device="cpu")
    with pytest.raises(UserError) as refused:
        get_exporter(fmt, source, cfg.quant)
    assert plan_from_config(cfg).notes == [f"the run will refuse this: {refused.value}"]


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_no_note_for_a_scheme_the_exporter_takes(fmt, tiny_models, texts, tmp_path):
    cfg = build_config(run_config(tiny_models["qwen3"], texts, tmp_path / "out", quant={"method": "gptq"},
                                  export={"format": fmt}))
    get_exporter(fmt, ModelSource(cfg.model.path, dtype=cfg.model.dtype, device="cpu"), cfg.quant)
    assert plan_from_config(cfg).notes == []
