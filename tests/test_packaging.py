"""The install maps runner/, algorithms/, kernels/, cluster/ under `shardquant` and leaks no top-level name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_no_top_level_names_leak(tmp_path):
    code = (
        "import importlib.util as u, shardquant, shardquant.algorithms, shardquant.kernels, shardquant.cluster;"
        "print([u.find_spec(n) is None for n in ('kernels', 'runner', 'algorithms', 'cluster')])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True, True, True]"


def test_entry_points_from_any_directory(tmp_path):
    script = str(Path(sys.executable).with_name("shardquant"))
    for argv in ([script, "--version"], [sys.executable, "-m", "shardquant", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("shardquant 0.")
