"""Small JSON files in the sweep folder: what the jobs need to know, and what each job did.

The callback writes `sweeper_state.json` before any job starts (the parent run id, the store,
the trial count); each job reads it, since environment variables may not reach joblib's
worker processes. Each job writes one `sweeper_outcomes/<trial>.json`, which the callback
reads back at the end for the summary and the exit status.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

STATE_FILE = "sweeper_state.json"
OUTCOMES_DIR = "sweeper_outcomes"
STATUSES = ("finished", "failed", "diverged", "skipped", "interrupted", "pruned")


@dataclass
class SweepState:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    num_trials: int  # 0 when unknown beforehand (a search sweeper)
    swept_keys: list[str]
    started_at: float  # time.time() when the sweep started
    git_commit: Optional[str] = None
    git_dirty: Optional[bool] = None
    name: str = ""  # the parent run's name


@dataclass
class Outcome:
    trial: int  # 1-based, in Hydra's job order
    name: str  # the trial's swept overrides, e.g. "lr=0.0002,ratio=0.9"
    status: str  # one of STATUSES; pruned: stopped by a search's pruner (sweeper/search.py)
    run_id: Optional[str] = None  # the child run; for a skipped trial, the earlier run
    message: str = ""
    validation_accuracy: float = math.nan
    test_accuracy: float = math.nan
    seconds: float = 0.0
    compile_seconds: float = math.nan
    unsent: int = 0  # tracking writes still waiting in the trial's outbox (sent later by sweeper.sync)
    output_dir: str = ""
    before_test_accuracy: float = math.nan  # the base model's, for the summary
    phases: str = ""  # where the trial's time went, e.g. "data 0.4s, model 1.2s, compile 4.6s, ..."


@dataclass
class Summary:
    num_trials: int  # 0 when unknown beforehand (a search sweeper)
    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: bool = False  # the sweep was stopped (a signal): trials without an outcome never ran

    @property
    def total(self) -> int:
        return max(self.num_trials, len(self.outcomes))

    def statuses(self) -> tuple[str, ...]:
        return STATUSES + (("not run",) if self.interrupted else ())

    def count(self, status: str) -> int:
        counted = sum(1 for o in self.outcomes if o.status == status)
        if status == ("not run" if self.interrupted else "failed"):
            counted += self.missing  # a job that left no outcome crashed, or never started
        return counted

    @property
    def missing(self) -> int:
        return max(self.num_trials - len(self.outcomes), 0)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    @property
    def unsent(self) -> int:
        return sum(o.unsent for o in self.outcomes)

    def line(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in self.statuses() if s in STATUSES[:4] or self.count(s))
        return f"{self.total} trials: {counts}"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True))
    os.replace(tmp, path)  # readers never see half a file


def write_state(sweep_dir: Path, state: SweepState) -> None:
    """Record a new sweep in `sweep_dir`, dropping the outcomes of an earlier one there."""
    shutil.rmtree(sweep_dir / OUTCOMES_DIR, ignore_errors=True)
    _write_json(sweep_dir / STATE_FILE, asdict(state))


def read_state(sweep_dir: Path) -> SweepState:
    path = sweep_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {STATE_FILE} in {sweep_dir}: the sweep was not opened. Run trials through "
            "`python -m sweeper`, whose conf/sweeper.yaml registers the callback "
            "hydra.callbacks.tracking that opens it."
        )
    return SweepState(**json.loads(path.read_text()))


def write_outcome(sweep_dir: Path, outcome: Outcome) -> None:
    _write_json(sweep_dir / OUTCOMES_DIR / f"{outcome.trial:04d}.json", asdict(outcome))


def read_summary(sweep_dir: Path, num_trials: int, interrupted: bool = False) -> Summary:
    outcomes = [
        Outcome(**json.loads(path.read_text()))
        for path in sorted((sweep_dir / OUTCOMES_DIR).glob("*.json"))
    ]
    return Summary(num_trials=num_trials, outcomes=outcomes, interrupted=interrupted)


__all__ = [
    "Outcome",
    "STATUSES",
    "Summary",
    "SweepState",
    "read_state",
    "read_summary",
    "write_outcome",
    "write_state",
]
