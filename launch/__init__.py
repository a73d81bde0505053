"""Launchers that take a config to a running job: Cloud TPU VM slices and SLURM GPU clusters."""
