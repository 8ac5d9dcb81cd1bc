"""The install maps runner/, algorithms/, kernels/, cluster/ under `shardquant` and leaks no top-level name."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import run_config

CHECKOUT = Path(__file__).resolve().parent.parent


def test_no_top_level_names_leak(tmp_path):
    """None of the four folders is importable by its own name; `kernels` may be Hugging
    Face's package (a transformers dependency), never ours."""
    code = (
        "import importlib.util as u, shardquant, shardquant.algorithms, shardquant.kernels, shardquant.cluster;"
        "print([getattr(u.find_spec(n), 'origin', None) for n in ('kernels', 'runner', 'algorithms', 'cluster')])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    origins = ast.literal_eval(proc.stdout)
    assert origins[1:] == [None, None, None]
    assert origins[0] is None or not Path(origins[0]).resolve().is_relative_to(CHECKOUT / "kernels"), origins[0]


def test_cli_imports_nothing_from_the_working_directory(tiny_models, texts, tmp_path):
    """`python -m shardquant` from a directory holding a `transformers` and a `kernels`
    package (as a checkout holds kernels/) runs on the installed libraries: `-m` put the
    working directory first on sys.path, and the CLI takes it off."""
    for name in ("transformers", "kernels"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the working directory\\'s {name}')\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_models["llama"], texts, tmp_path / "out",
                                             quant={"method": "rtn"}, export={"format": "fake"})))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([sys.executable, "-m", "shardquant", "quantize", str(cfg), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "report.json").is_file()


def test_entry_points_from_any_directory(tmp_path):
    script = str(Path(sys.executable).with_name("shardquant"))
    for argv in ([script, "--version"], [sys.executable, "-m", "shardquant", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("shardquant 0.")


def test_checkouts_are_dropped_from_sys_path(tmp_path):
    """`drop_checkouts` (run by every block worker: Ray puts the driver's working directory
    on its workers' sys.path) takes a directory holding the four folders off sys.path, and
    leaves others."""
    fake, other = tmp_path / "checkout", tmp_path / "other"
    for name in ("runner", "algorithms", "kernels", "cluster"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("raise ImportError('the checkout was imported')\n")
        (other / name).mkdir(parents=True)
    (fake / "runner" / "__main__.py").write_text("")
    code = ("import sys, importlib.util as u; from shardquant.checkout import drop_checkouts;"
            f"sys.path[:0] = ['', {str(other)!r}]; drop_checkouts();"
            f"print(sys.path[0] == {str(other)!r}, getattr(u.find_spec('kernels'), 'origin', None))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=fake, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kept, origin = proc.stdout.split()
    assert kept == "True"
    assert origin == "None" or not Path(origin).resolve().is_relative_to(fake), origin
