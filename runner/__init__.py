"""shardquant: distributed, resumable blockwise post-training quantization for decoder LLMs.

Importing the package is cheap: torch, transformers and Ray load only in the modules that
need them.
"""

__version__ = "0.1.0"
