"""Speed benchmarks of the trainer and the sweeper: `python -m benchmarks.<name> [--quick]`.

throughput (train step against the PyTorch peer), epoch (packed rows against padded batches),
step_profile (where our step's time goes),
sweep_overhead (what a sweep spends besides training), evaluate (score and generate speed).
See benchmarks/README.md.
"""

import os

# Several processes of one benchmark (the sides, the peak workers) share one GPU: JAX's default of
# taking 75% of its memory at start would leave the next process none. Set before JAX is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
