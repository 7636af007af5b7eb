"""Speed benchmarks of the trainer and the sweeper: `python -m benchmarks.<name> [--quick]`.

throughput (train step against the PyTorch peer), epoch (packed rows against padded batches),
step_profile (where our step's time goes),
sweep_overhead (what a sweep spends besides training), evaluate (score and generate speed).
See benchmarks/README.md.
"""
