"""`shardquant compare`: the CSV holds report.json's numbers exactly, the Pareto front is the
hand-worked one, the plots are real PNGs, and a directory without a report is an error when
named, a warning when globbed. Runs come from the shared RTN grid (tests/conftest.py)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from shardquant.cli import main
from shardquant.tools.compare import build_rows, pareto_front, read_report, to_csv, to_markdown

DONE = ("bits-2", "bits-4", "bits-8")


def test_pareto_front_hand_worked():
    # (seconds, perplexity): (3, 4) is beaten by (2, 3) in both; (5, 5) by everything before it;
    # the repeated (2, 3) dominates neither copy; NaN is never on the front.
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5), (math.nan, 0.5), (4, 1.5)]
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def _read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_csv_numbers_equal_the_reports(rtn_grid, tmp_path):
    out = tmp_path / "cmp"
    runs = [str(rtn_grid["output"] / n) for n in DONE]
    assert main(["compare", *runs, "--output", str(out)]) == 0
    rows = _read_csv(out / "compare.csv")
    assert [r["run"] for r in rows] == runs  # sorted by bits within the method
    for r in rows:
        rep = json.loads((rtn_grid["output"] / r["run"].rsplit("/", 1)[1] / "report.json").read_text())
        assert float(r["ppl_fp"]) == rep["ppl"]["fp"]
        assert float(r["ppl_quantized"]) == rep["ppl"]["quantized"]
        assert float(r["calibrate_s"]) == rep["timing"]["calibrate_s"]
        assert float(r["total_s"]) == rep["timing"]["total_s"]
        assert int(r["peak_rss_bytes"]) == rep["memory"]["peak_rss_bytes"]
        assert int(r["checkpoint_bytes"]) == rep["export"]["bytes"]
        assert int(r["calib_tokens"]) == rep["calibration"]["tokens"] == 0  # rtn is data-free
        assert (r["method"], int(r["bits"]), int(r["group_size"]), r["symmetric"]) == (
            "rtn", rep["config"]["quant"]["bits"], 32, "True")
        assert (r["calib_data"], r["calib_samples"], r["calib_seq_len"]) == (rep["config"]["calib"]["path"], "4", "32")
        assert r["scheme"] == ""  # the config has no quant.scheme
    # the pareto column by its definition: a marked row is beaten by none, an unmarked one by some
    pts = [(float(r["calibrate_s"]), float(r["ppl_quantized"])) for r in rows]
    for (x, y), r in zip(pts, rows, strict=True):
        beaten = any(qx <= x and qy <= y and (qx, qy) != (x, y) for qx, qy in pts)
        assert (r["pareto"] == "True") == (not beaten)
    # a smaller checkpoint at fewer bits: the size column is the export's, not a constant
    assert int(rows[0]["checkpoint_bytes"]) < int(rows[1]["checkpoint_bytes"]) < int(rows[2]["checkpoint_bytes"])
    md = (out / "compare.md").read_text()
    assert sum(ln.startswith("| `") for ln in md.splitlines()) == 3 and "W8 sym" in md and "![quality_vs_cost](quality_vs_cost.png)" in md
    assert sum("| none (data-free) |" in ln for ln in md.splitlines()) == 3


def test_plots_are_pngs(rtn_grid):
    import matplotlib.image as mpimg

    for name in ("quality_vs_bits.png", "quality_vs_cost.png"):
        path = rtn_grid["output"] / "compare" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.shape == (450, 700, 4)  # figsize 7 x 4.5 at 100 dpi, RGBA
        assert img[..., :3].std() > 0.05  # something is drawn


def test_named_dir_without_report_is_an_error_a_globbed_one_a_warning(rtn_grid, tmp_path, capsys):
    out = tmp_path / "cmp"
    failed = rtn_grid["output"] / "bits-3"
    assert main(["compare", str(rtn_grid["output"] / "bits-2"), str(failed), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{failed}' holds no report.json" in err
    assert not out.exists()

    for args in ([f"{rtn_grid['output']}/*"], [str(rtn_grid["output"])]):  # a glob; a directory of runs
        assert main(["compare", *args, "--output", str(out)]) == 0
        cap = capsys.readouterr()
        assert [ln for ln in cap.err.splitlines()] == [f"shardquant: skipped: '{failed}' holds no report.json (not a finished run)"]
        assert sorted(r["run"].rsplit("/", 1)[1] for r in _read_csv(out / "compare.csv")) == list(DONE)

    assert main(["compare", str(tmp_path / "nothing-*"), "--output", str(out)]) == 2
    assert "matches nothing" in capsys.readouterr().err


def test_a_broken_report_is_named(rtn_grid, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(rtn_grid["output"] / "bits-4", run, ignore=shutil.ignore_patterns("model", "state"))
    rep = json.loads((run / "report.json").read_text())
    del rep["timing"]["calibrate_s"]
    (run / "report.json").write_text(json.dumps(rep))
    assert main(["compare", str(run), "--output", str(tmp_path / "cmp")]) == 2
    assert "lacks 'timing.calibrate_s'" in capsys.readouterr().err
    rep["timing"]["calibrate_s"] = "12"
    (run / "report.json").write_text(json.dumps(rep))
    assert main(["compare", str(run), "--output", str(tmp_path / "cmp")]) == 2
    assert "'timing.calibrate_s' is not a number (got '12')" in capsys.readouterr().err
    (run / "report.json").write_text("{not json")
    assert main(["compare", str(run), "--output", str(tmp_path / "cmp")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_task_and_scheme_columns_follow_the_reports(rtn_grid):
    a = read_report(rtn_grid["output"] / "bits-4")
    b = json.loads(json.dumps(read_report(rtn_grid["output"] / "bits-8")))
    b["config"]["quant"]["scheme"] = "W8A16"
    b["tasks"] = {"quantized": {"arc_easy": {"acc": 0.25, "acc_norm": 0.5}}, "fp": {"arc_easy": {"acc": 0.75}}}
    rows = build_rows([("a", a), ("b", b)])
    table = list(csv.DictReader(to_csv(rows).splitlines()))
    assert [c for c in table[0] if c.startswith("tasks.")] == [
        "tasks.fp.arc_easy.acc", "tasks.quantized.arc_easy.acc", "tasks.quantized.arc_easy.acc_norm"]
    assert table[0]["tasks.quantized.arc_easy.acc"] == "" and table[0]["scheme"] == ""
    assert float(table[1]["tasks.quantized.arc_easy.acc_norm"]) == 0.5 and table[1]["scheme"] == "W8A16"
    md = to_markdown(rows)
    assert "tasks.quantized.arc_easy.acc" in md.splitlines()[0] and "W8A16 (W8 sym)" in md


@pytest.mark.parametrize("bad", [[], ["--output"]])
def test_compare_needs_a_run(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", *bad])
    assert e.value.code == 2


def test_a_wandb_run_folder_stands_for_its_run(rtn_grid, tmp_path):
    """A sweep run writes report.json to its output and W&B's files to output/wandb/offline-run-*:
    naming the W&B folder (or globbing for it) finds the run."""
    run = tmp_path / "sweep" / "abc123"
    shutil.copytree(rtn_grid["output"] / "bits-4", run, ignore=shutil.ignore_patterns("model", "state"))
    (run / "wandb" / "offline-run-20260101_000000-abc123" / "files").mkdir(parents=True)
    out = tmp_path / "cmp"
    for arg in (str(next((run / "wandb").iterdir())), f"{tmp_path}/sweep/*/wandb/offline-run-*", str(tmp_path / "sweep")):
        assert main(["compare", arg, "--output", str(out)]) == 0
        assert [r["run"] for r in _read_csv(out / "compare.csv")] == [str(run)]


def test_runs_without_perplexity_are_listed_but_not_plotted(rtn_grid, tmp_path):
    """A run without eval.path has ppl null: it is a row, never on the front; an infinite
    perplexity (a broken 2-bit run) is a row and a point."""
    reports = []
    for name, ppl in (("none", None), ("inf", math.inf), ("ok", 10.0)):
        rep = json.loads(json.dumps(read_report(rtn_grid["output"] / "bits-4")))
        rep["ppl"] = {"fp": None if ppl is None else 9.0, "quantized": ppl}
        run = tmp_path / name
        run.mkdir()
        (run / "report.json").write_text(json.dumps(rep))
        reports.append(str(run))
    out = tmp_path / "cmp"
    assert main(["compare", *reports, "--output", str(out)]) == 0
    rows = {r["run"].rsplit("/", 1)[1]: r for r in _read_csv(out / "compare.csv")}
    assert rows["none"]["ppl_quantized"] == "" and rows["none"]["pareto"] == "False"
    assert rows["inf"]["ppl_quantized"] == "inf"
    assert rows["ok"]["pareto"] == "True"  # same calibration seconds, lower perplexity than inf
    assert "| — |" in (out / "compare.md").read_text()
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "quality_vs_cost.png").shape == (450, 700, 4)
