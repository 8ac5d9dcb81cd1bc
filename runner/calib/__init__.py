"""Calibrating one block: the steps, statistics, scale search, solvers, stage cache."""
