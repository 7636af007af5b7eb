"""Terminal progress: a line per trial with the sweep's ETA, and a tqdm bar over its steps."""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def sweep_line(trial: int, num_trials: int, name: str, started_at: float, done: int) -> str:
    """`trial 3 of 16: lr=0.0002,ratio=0.9 (elapsed 4m10s, ETA 18m)`, from the trials done so far."""
    elapsed = time.time() - started_at
    if not num_trials:
        return f"trial {trial}: {name} (elapsed {format_seconds(elapsed)})"
    if done:
        eta = format_seconds(elapsed / done * max(num_trials - done, 0))
    else:
        eta = "after the first trial"
    return f"trial {trial} of {num_trials}: {name} (elapsed {format_seconds(elapsed)}, ETA {eta})"


class TrialBar:
    """tqdm over a trial's steps, showing the loss and throughput of the latest step.

    The bar appears with the first step, so a trial that fails validation prints none.
    """

    def __init__(self, trial: int, num_trials: int, total_steps: Optional[int]) -> None:
        self.description = f"trial {trial}/{num_trials}"
        self.total_steps = total_steps
        self.bar: Optional[tqdm] = None

    def __call__(self, record) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.total_steps, desc=self.description, unit="step", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True,
            )
        self.bar.set_postfix(loss=f"{record.loss:.4f}", tokens_per_s=f"{record.tokens_per_second:,.0f}", refresh=False)
        self.bar.update(record.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
