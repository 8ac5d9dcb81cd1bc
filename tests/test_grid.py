"""`shardquant grid`: every cell of the product runs in its own process, a failed cell is recorded
while the others finish, a rerun skips finished cells, and a bad grid file stops before any run."""

from __future__ import annotations

import json

import pytest
import yaml

from shardquant.cli import main
from shardquant.tools.grid import CELL_LOG, cell_names, finished, load_grid


def _summary(rtn_grid) -> dict:
    return json.loads((rtn_grid["output"] / "grid.json").read_text())


def test_grid_runs_every_cell_and_records_the_failed_one(rtn_grid):
    assert rtn_grid["rc"] == 1  # one cell failed
    cells = {c["name"]: c for c in rtn_grid["summary"]["cells"]}
    assert list(cells) == ["bits-2", "bits-3", "bits-4", "bits-8"]
    bad = cells["bits-3"]
    assert bad["status"] == "failed" and bad["exit_code"] == 2
    assert "cannot hold quant.bits=3" in bad["error"] and bad["error"].startswith("shardquant: error:")
    for name in ("bits-2", "bits-4", "bits-8"):
        c = cells[name]
        assert c["status"] == "done" and c["exit_code"] == 0
        report = json.loads((rtn_grid["output"] / name / "report.json").read_text())
        assert report["config"]["quant"]["bits"] == c["values"]["quant.bits"]
        assert report["config"]["quant"]["method"] == "rtn"
        assert report["config"]["output"] == str(rtn_grid["output"] / name)
        assert (rtn_grid["output"] / name / "model" / "model.safetensors.index.json").is_file()
    assert not (rtn_grid["output"] / "bits-3" / "report.json").exists()
    # compare ran over the finished cells only
    csv_text = (rtn_grid["output"] / "compare" / "compare.csv").read_text()
    assert "bits-3" not in csv_text and all(f"bits-{b}" in csv_text for b in (2, 4, 8))


def test_rerun_skips_finished_cells_and_retries_the_failed_one(rtn_grid):
    out = rtn_grid["output"]
    stamps = {}
    for name in ("bits-2", "bits-4", "bits-8"):
        (out / name / CELL_LOG).write_text("marker: not rerun\n")
        st = (out / name / "report.json").stat()
        stamps[name] = (st.st_mtime_ns, st.st_ino)
    (out / "bits-3" / CELL_LOG).write_text("marker: old log\n")

    assert main(["grid", str(rtn_grid["grid"])]) == 1
    cells = {c["name"]: c for c in _summary(rtn_grid)["cells"]}
    for name, stamp in stamps.items():
        assert cells[name]["status"] == "skipped"
        assert (out / name / CELL_LOG).read_text() == "marker: not rerun\n"
        st = (out / name / "report.json").stat()
        assert (st.st_mtime_ns, st.st_ino) == stamp
    assert cells["bits-3"]["status"] == "failed"
    assert "marker" not in (out / "bits-3" / CELL_LOG).read_text()  # it ran again


def test_a_cell_of_another_config_is_not_finished(rtn_grid):
    same = load_grid(rtn_grid["grid"])
    assert [finished(c) for c in same.cells] == [True, False, True, True]
    changed = load_grid(rtn_grid["grid"], {"quant.symmetric": False})
    assert not any(finished(c) for c in changed.cells)


def _grid_file(tmp_path, grid: dict, **top) -> str:
    base = {"model": {"path": str(tmp_path / "model")}, "calib": {"path": str(tmp_path / "c.txt")},
            "output": "ignored"}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": base, "grid": grid, "output": str(tmp_path / "out"), **top}, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(("grid", "top", "needle"), [
    ({"quant.method": ["rtn"], "quant.bitz": [3, 4]}, {}, "cell quant.method=rtn, quant.bitz=3: unknown config key 'quant.bitz'"),
    ({"quant.bits": [4, 12]}, {}, "cell quant.bits=12: quant.bits: must be between 2 and 8"),
    ({"quant.bits": 4}, {}, "grid.quant.bits: Input should be a valid list"),
    ({"quant.bits": []}, {}, "'quant.bits' lists no value"),
    ({"quant.bits": [4, 4]}, {}, "'quant.bits' lists 4 twice"),
    ({"output": ["a", "b"]}, {}, "'output' cannot be varied"),
    ({"quant.bits": [4]}, {"cells": 3}, "unknown key 'cells'"),
])
def test_a_bad_grid_stops_before_any_run(tmp_path, capsys, grid, top, needle):
    path = _grid_file(tmp_path, grid, **top)
    assert main(["grid", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and path in err, err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_cells_and_runs_nothing(tmp_path, capsys):
    path = _grid_file(tmp_path, {"quant.method": ["rtn", "gptq"], "quant.group_size": [32, -1]})
    assert main(["grid", path, "--dry-run", "--calib.n_samples=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "4 cells; nothing run"
    assert lines[0].endswith("method-rtn_group_size-32: quant.method=rtn, quant.group_size=32")
    assert lines[3].endswith("method-gptq_group_size--1: quant.method=gptq, quant.group_size=-1")
    assert not (tmp_path / "out").exists()
    for bad, needle in (("--output=x", "--output cannot be overridden"), ("--quant.method=awq", "--quant.method is also a grid key")):
        assert main(["grid", path, "--dry-run", bad]) == 2
        assert needle in capsys.readouterr().err
    grid = load_grid(path, {"calib.n_samples": 8})
    assert {c.config.calib.n_samples for c in grid.cells} == {8}
    assert [c.config.output for c in grid.cells] == [str(c.output) for c in grid.cells]


def test_cell_names_stay_unique():
    keys = ["calib.seq_len", "eval.seq_len", "calib.path"]
    combos = [(32, 32, "/a/wiki.txt"), (32, 32, "/b/wiki.txt")]
    names = cell_names(keys, combos)
    assert names[0].startswith("calib.seq_len-32_eval.seq_len-32_path-wiki.txt-")
    assert len(set(names)) == 2


def test_the_benchmark_matrix_is_a_valid_12_cell_grid(tmp_path):
    """benchmarks/matrix.yaml (the real-model matrix) validates with a base of the right shape."""
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "benchmarks" / "matrix.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"model": {"path": "m"}, "calib": {"path": "c.txt"}, "eval": {"path": "e.txt"}, "export": {"format": "fake"}}))
    spec["output"] = str(tmp_path / "out")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    grid = load_grid(tmp_path / "grid.yaml")
    got = {(c.config.quant.method, c.config.quant.bits, c.config.quant.group_size) for c in grid.cells}
    assert got == {(m, b, g) for m in ("rtn", "gptq", "awq") for b in (3, 4) for g in (64, -1)}
    assert len({c.output for c in grid.cells}) == 12


def test_fuzzed_grid_files_are_checked_or_refused_in_one_line(tmp_path):
    """Whatever a grid file holds, `grid --dry-run` lists its cells or refuses it in one line."""
    import contextlib
    import io

    from conftest import FUZZ_COUNTS
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from shardquant.config import reference_rows

    keys = [k for k, _, _ in reference_rows()] + ["quant", "quant.bits.x", "", "a..b", "output"]
    odd = st.sampled_from(["2001-12-14", "~", "", "a\x00b", "-1", "1e400", "[", "*a", "ray"])
    scalar = st.none() | st.booleans() | st.integers(-3, 10) | st.floats() | st.text(max_size=6) | odd
    value = scalar | st.lists(scalar, max_size=2) | st.dictionaries(st.text(max_size=4), scalar, max_size=2)
    good_base = {"model": {"path": "m"}, "calib": {"path": "c.txt"}}
    doc = st.fixed_dictionaries(
        {"grid": st.dictionaries(st.sampled_from(keys), st.lists(value, max_size=3) | scalar, max_size=3)},
        optional={"base": st.just(good_base) | value | st.just("missing.yaml"), "output": scalar, "x": scalar},
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(doc)
    @example({"base": good_base, "grid": {"quant.bits": [4, 3], "calib.seed": ["2001-12-14"]}})
    @example({"base": good_base, "grid": {"quant.bits.x": [1]}})
    @example({"base": good_base, "grid": {"quant.bits": [4]}, "output": "a\x00b"})
    def run(d):
        FUZZ_COUNTS["grid files"] = FUZZ_COUNTS.get("grid files", 0) + 1
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["grid", str(path), "--dry-run"])
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert code == 0 and lines == [] or (
            code == 2 and len(lines) == 1 and lines[0].startswith("shardquant: error: ")), (d, code, err.getvalue())

    run()
