"""Tools built on the library: the teacher -> student pipeline, the classical baselines and sweeps (local
or SLURM arrays). They use the trainer only through `run_training` or the `scalelora.train` command. The
results study of this repository's datasets is `studies/results.py`, beside the library;
`scalelora.study.results` only finds and runs it."""
