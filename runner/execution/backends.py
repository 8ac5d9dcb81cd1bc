"""Executors by `cluster.backend` name, found through the `shardquant.executors` entry points.

The runner never imports an executor that lives elsewhere (the Ray ones are in
`shardquant.cluster`): pyproject.toml declares each backend's factory as an entry point, and
a run looks its backend up here. Another package adds a backend the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from shardquant.errors import UserError
from shardquant.execution.protocol import ExecutorFactory

GROUP = "shardquant.executors"


def executor_factory(backend: str) -> ExecutorFactory:
    """The `ExecutorFactory` registered for `backend`; UserError listing the installed ones."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if backend not in found:
        have = ", ".join(sorted(found)) or "none"
        raise UserError(
            f"cluster.backend: no executor '{backend}' is installed (installed: {have}); "
            "reinstall shardquant (pip install -e .) so its entry points are registered"
        )
    return found[backend].load()
