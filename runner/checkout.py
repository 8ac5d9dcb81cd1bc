"""Keeping a shardquant source checkout off sys.path.

The checkout's folders install only as `shardquant.*`. Found on sys.path by their own
names, its kernels/ would shadow the `kernels` package transformers imports. Python puts the
working directory first for `python -m` and `-c`, and Ray puts the driver's working
directory on every worker's path, so a run started from a checkout's root would import
the folder in place of the library.
"""

from __future__ import annotations

import os
import sys

_FOLDERS = ("runner", "algorithms", "kernels", "cluster")


def is_checkout(directory: str) -> bool:
    """Whether `directory` ('' is the working directory) is a shardquant source checkout."""
    root = directory or os.curdir
    return os.path.isfile(os.path.join(root, "runner", "__main__.py")) and all(
        os.path.isfile(os.path.join(root, name, "__init__.py")) for name in _FOLDERS
    )


def drop_checkouts() -> None:
    """Take every checkout off sys.path (the installed package is found without them)."""
    sys.path[:] = [p for p in sys.path if not is_checkout(p)]
