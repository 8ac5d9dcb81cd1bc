"""The executor recipe of docs/architecture.md, followed once: an executor in a package of its
own, registered under the `shardquant.executors` entry points, runs a quantize job by its
`cluster.backend` name without the runner importing it."""

from __future__ import annotations

import textwrap

import pytest
from conftest import read_checkpoint, run_config

from shardquant.config import build_config
from shardquant.errors import UserError
from shardquant.execution.backends import executor_factory
from shardquant.pipeline import quantize

PLUGIN = '''
"""A third-party executor: the in-process one, counting the steps it is asked for."""
from shardquant.execution.local import LocalExecutor

CALLS = []


class CountingExecutor(LocalExecutor):
    def begin_block(self, index):
        CALLS.append(("begin_block", index))
        super().begin_block(index)

    def solve(self, tasks):
        CALLS.append(("solve", tuple(t.group for t in tasks)))
        return super().solve(tasks)


def make(cfg, source):
    return CountingExecutor(cfg)
'''


@pytest.fixture
def counting_backend(tmp_path, monkeypatch):
    """A package `counting_backend` with a dist-info whose entry point names it `counting`."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "counting_backend.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "counting_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: counting-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[shardquant.executors]\ncounting = counting_backend:make\n")
    monkeypatch.syspath_prepend(str(site))
    import counting_backend

    counting_backend.CALLS.clear()
    yield counting_backend
    monkeypatch.delitem(__import__("sys").modules, "counting_backend")


def test_an_installed_executor_runs_the_job_by_name(counting_backend, tiny_models, texts, tmp_path, one_thread):
    cfg = dict(quant={"method": "gptq", "bits": 4, "group_size": 32}, eval={"enabled": False})
    local = quantize(build_config(run_config(tiny_models["qwen2"], texts, tmp_path / "local", **cfg)),
                     show_progress=False)
    plugged = quantize(build_config(run_config(tiny_models["qwen2"], texts, tmp_path / "plugged",
                                               cluster={"backend": "counting"}, **cfg)), show_progress=False)
    assert plugged["cluster"]["backend"] == "counting"
    blocks = len(local["blocks"])
    assert [c for c in counting_backend.CALLS if c[0] == "begin_block"] == [("begin_block", i) for i in range(blocks)]
    # True-sequential GPTQ: one solve per input group per block, in the adapter's order.
    groups = [c[1] for c in counting_backend.CALLS if c[0] == "solve"]
    assert groups == [("attn_in",), ("attn_out",), ("mlp_in",), ("mlp_out",)] * blocks
    ours, theirs = read_checkpoint(tmp_path / "local" / "model"), read_checkpoint(tmp_path / "plugged" / "model")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)


def test_an_unknown_backend_names_the_installed_ones(tiny_models, texts, tmp_path):
    with pytest.raises(UserError, match=r"cluster\.backend: not an installed executor \(installed: local, ray\)"):
        build_config(run_config(tiny_models["llama"], texts, tmp_path / "x", cluster={"backend": "counting"}))
    with pytest.raises(UserError, match=r"cluster\.backend: no executor 'nope' is installed \(installed: local, ray"):
        executor_factory("nope")
