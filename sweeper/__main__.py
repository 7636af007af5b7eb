"""`python -m sweeper -m lr=2e-3,2e-4 ratio=0.5,1.0`: a grid of trials, each a run in MLflow.

Hydra's multirun does not turn failed jobs into an exit status; the callback records each
trial's outcome and this entry point exits 1 when any trial failed, 0 otherwise, and 128 + the
signal (130 for Ctrl-C, 143 for SIGTERM) when it was stopped.
"""

from __future__ import annotations

import gc
import sys

from trainer.hostmem import tune_malloc

tune_malloc()  # before JAX, MLflow or tqdm start a thread

from sweeper.app import main
from sweeper.callbacks import close_open_sweep, exit_status
from trainer import interrupt

if __name__ == "__main__":
    interrupt.install()  # SIGTERM (preemption) and Ctrl-C end the runs KILLED and print the summary
    stopped = None
    try:
        main()
    except KeyboardInterrupt as error:
        stopped = error
    finally:
        close_open_sweep(stopped)  # only when Hydra stopped before the sweep's end
    # Everything is recorded and closed by now. Freezing the heap spares the interpreter's last
    # garbage collection a walk over JAX's, MLflow's and Hydra's objects: ~1 s at exit. atexit
    # handlers (log flushing among them) still run.
    gc.freeze()
    sys.exit(exit_status())
