"""Tools built on the library: the teacher -> student pipeline, the classical baselines, sweeps (local or
SLURM arrays) and the results study. They use the trainer only through `run_training`."""
