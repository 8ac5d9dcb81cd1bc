"""Docs that must stay true: the config reference table and the CI command."""

from __future__ import annotations

from pathlib import Path

from shardquant.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert reference_markdown() in doc, "docs/config.md is stale: regenerate its table with reference_markdown()"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in ci.splitlines()[-1]
    assert "shardquant quickstart" in (ROOT / "scripts" / "quickstart.sh").read_text()
