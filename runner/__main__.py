"""`python -m shardquant`: the CLI, importing nothing from the working directory.

`-m` puts the working directory first on sys.path; in a checkout that would make its
folders importable by their own names (kernels/ would shadow the `kernels` package
transformers imports), and anywhere else a stray file could shadow a library. The
console script never has it, so neither does this (what Python 3.11's -P does).
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from shardquant.cli import main  # noqa: E402

sys.exit(main())
