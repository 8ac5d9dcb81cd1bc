"""Downstream tasks through lm-evaluation-harness, computed blockwise (`harness`, `sequences`)."""
