"""The Ray executor and launch recipes (Slurm, ray job submit, W&B sweeps)."""
