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
    """tqdm over a trial's steps, showing the phase it is in, then the loss and throughput.

    The bar appears with the trial's first phase; its total (and so its ETA) is set when training
    starts, whether the length came from train.total_steps or from train.epochs.
    """

    def __init__(self, trial: int, num_trials: int, total_steps: Optional[int]) -> None:
        self.description = f"trial {trial}/{num_trials}" if num_trials else f"trial {trial}"
        self.total_steps = total_steps
        self.bar: Optional[tqdm] = None
        self.started: dict[str, float] = {}  # phase -> time.perf_counter() when it began

    def _open(self) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(
                total=self.total_steps, desc=self.description, unit="step", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True,
            )
        return self.bar

    def phase(self, name: str, details: dict) -> None:
        """trainer.trial's on_phase hook."""
        bar = self._open()
        self.started[name] = time.perf_counter()
        if name == "training":
            bar.reset(total=details.get("total_steps"))
            bar.update(details.get("start_step", 0))
            bar.set_description(self.description, refresh=False)
            bar.set_postfix_str("compiling" if not details.get("start_step") else "resuming", refresh=True)
        else:
            bar.set_description(f"{self.description} {name}", refresh=True)

    def __call__(self, record) -> None:
        bar = self._open()
        bar.set_postfix(loss=f"{record.loss:.4f}", tokens_per_s=f"{record.tokens_per_second:,.0f}", refresh=False)
        bar.update(record.step - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def phase_times(metrics: dict) -> str:
    """`data 0.4s, model 1.2s, before 5.1s, compile 4.6s, train 20.1s (72 steps), eval 3.0s` from a
    trial's metrics: where its time went."""
    parts = []
    for key, word in (("data_seconds", "data"), ("model_seconds", "model"), ("eval_before_seconds", "before"),
                      ("compile_seconds", "compile"), ("train_seconds", "train"), ("eval_seconds", "eval"),
                      ("save_seconds", "save")):
        value = metrics.get(key)
        if value is None or (key in ("eval_before_seconds", "save_seconds") and value < 0.05):
            continue
        text = f"{word} {format_seconds(value) if value >= 60 else f'{value:.1f}s'}"
        if key == "train_seconds" and "steps" in metrics:
            text += f" ({metrics['steps']:.0f} steps)"
        parts.append(text)
    return ", ".join(parts)
