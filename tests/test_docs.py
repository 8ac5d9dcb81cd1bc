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


def test_source_paths_in_the_docs_exist():
    """Every `runner/...`, `cluster/...`, `algorithms/...` file the README and docs/ name is there."""
    import re

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {
        (doc.name, m) for doc in docs
        for m in re.findall(r"\b((?:runner|cluster|algorithms|kernels|tests|benchmarks)/[\w/]+\.\w+)", doc.read_text())
    }
    assert named, "the docs name no source file: the pattern is wrong"
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (ROOT / path).exists())
    assert missing == []
