"""Validation accuracy while a trial trains: every `eval.every_steps` steps, on a small fixed subset.

The subset is `eval.every_examples` validation examples, class-stratified and drawn with the
trial's seed, so every trial of a sweep with the same seed is measured on the same reviews and
their curves compare. Each measurement goes to an optional `on_eval(record)` hook; a hook that
returns a reason stops the trial there (status "pruned": a search's pruner, sweeper/search.py,
decided it cannot catch up). The trainer itself knows nothing of the search.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

from trainer import data as data_lib
from trainer import packing
from trainer.config import TrialConfig
from trainer.evaluate import evaluate_split
from trainer.train import TrainState, all_params


@dataclass
class EvalRecord:
    step: int  # the updates applied before this measurement
    validation_accuracy: float  # on the subset
    examples: int  # size of the subset
    seconds: float  # what the measurement took


EvalHook = Callable[[EvalRecord], Optional[str]]  # returns a reason to stop, or None to go on


def validation_subset(cfg: TrialConfig, splits: dict, tokenizer) -> packing.TokenizedSplit:
    """The seeded class-stratified subset of `eval.every_examples` validation examples, tokenized."""
    validation = splits["validation"]
    ratio = min(1.0, cfg.eval.every_examples / max(len(validation), 1))
    chosen = data_lib.sample_ratio(validation, ratio, cfg.seed)
    return packing.tokenize_examples(chosen, tokenizer, cfg.data.cache_dir)


class PeriodicEvaluation:
    """Called by train_loop every `every` steps with the train state; records and forwards each result."""

    def __init__(self, cfg: TrialConfig, splits: dict, tokenizer, graphdef, on_eval: Optional[EvalHook]) -> None:
        self.every = int(cfg.eval.every_steps)
        self.graphdef, self.tokenizer, self.on_eval, self.seed = graphdef, tokenizer, on_eval, cfg.seed
        self.subset = validation_subset(cfg, splits, tokenizer)
        # The subset is already the cut: no max_examples on top of it, no predictions file.
        self.eval_cfg = dataclasses.replace(cfg.eval, max_examples=None, predictions=False)
        self.records: list[EvalRecord] = []

    def __call__(self, step: int, state: TrainState) -> Optional[str]:
        t0 = time.perf_counter()
        report = evaluate_split(
            "validation", self.graphdef, all_params(state), self.subset, self.tokenizer, self.eval_cfg, seed=self.seed
        )
        record = EvalRecord(step, report.accuracy, report.num_examples, time.perf_counter() - t0)
        self.records.append(record)
        return self.on_eval(record) if self.on_eval is not None else None


__all__ = ["EvalHook", "EvalRecord", "PeriodicEvaluation", "validation_subset"]
