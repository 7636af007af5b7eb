"""K trials trained together (trainer.vectorized.run_trials) against the same K trials one by one (run_trial).

    python -m benchmarks.vectorized [--quick] [--ks 2 4 8] [--steps 60] [--eval-examples 128]

Each K is a small lr x ratio grid of the `tiny` preset (train=cpu: batch 32 rows of 128 tokens),
train.total_steps fixed, evaluated after training on the first --eval-examples test reviews
(no before-training evaluation). Sequential is what Hydra's basic launcher does in one process:
run_trial per trial, the step compiled by the first and reused by the rest. Vectorised is one
run_trials call: one compilation for the group. Both sides start with their step caches
cleared and the persistent compilation cache off, so each pays its own compilation, as a
first sweep would; data, tokenizer and the evaluation programs are warmed beforehand, once for
both. trials/hour counts the whole trial
(data, model, compilation, training, evaluation); the training columns count compilation and
steps only. A last column checks that both sides trained the same trials.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    data_config, eval_preset, model_preset, optim_preset, print_header, print_table, train_preset,
)


def trial_configs(k: int, args, folder: Path) -> list:
    """K trials of one shape: learning rates spread over a decade, ratios alternating 1.0 / 0.5."""
    from trainer.config import TrialConfig

    train = train_preset("cpu")
    train.total_steps = args.steps
    train.compilation_cache = False  # each side compiles its own step, as in a first sweep
    if args.quick:
        train.batch_size = 8
    evaluation = eval_preset("score")
    evaluation.max_examples, evaluation.splits = args.eval_examples, ["test"]
    evaluation.before_training, evaluation.predictions = False, False
    return [
        TrialConfig(
            lr=float(lr), warmup=0, ratio=(1.0, 0.5)[i % 2], seed=0, output_dir=str(folder / f"trial{i}"),
            model=model_preset("tiny"), data=data_config(), optim=optim_preset(), train=train, eval=evaluation,
        )
        for i, lr in enumerate(np.geomspace(2e-4, 2e-3, k))
    ]


def warm_up(cfgs: list, folder: Path) -> None:
    """Tokenizer, tokenized subsets and the evaluation programs, so neither side pays for them."""
    import dataclasses

    from trainer.trial import prepare_data, run_trial

    for cfg in cfgs:
        prepare_data(cfg)
    run_trial(dataclasses.replace(cfgs[0], output_dir=str(folder / "warmup"),
                                  train=dataclasses.replace(cfgs[0].train, total_steps=1)))


def measure(k: int, args, folder: Path) -> list:
    from trainer.train import make_train_step
    from trainer.trial import run_trial
    from trainer.vectorized import make_vectorized_step, run_trials

    make_train_step.cache_clear()
    cfgs = trial_configs(k, args, folder / f"sequential{k}")
    start = time.perf_counter()
    alone = [run_trial(cfg) for cfg in cfgs]
    sequential_wall = time.perf_counter() - start
    sequential_train = sum(r.metrics["compile_seconds"] + r.metrics["train_seconds"] for r in alone)

    make_vectorized_step.cache_clear()
    cfgs = trial_configs(k, args, folder / f"vectorized{k}")
    start = time.perf_counter()
    together = run_trials(cfgs)
    vectorized_wall = time.perf_counter() - start
    vectorized_train = together[0].metrics["compile_seconds"] + max(r.metrics["train_seconds"] for r in together)

    loss_gap = max(
        abs(a.metrics["final_loss"] - b.metrics["final_loss"]) / abs(a.metrics["final_loss"])
        for a, b in zip(alone, together)
    )
    same_accuracy = all(a.metrics["test_accuracy"] == b.metrics["test_accuracy"] for a, b in zip(alone, together))
    trial_steps = k * args.steps
    return [
        k,
        3600 * k / sequential_wall,
        3600 * k / vectorized_wall,
        sequential_wall / vectorized_wall,
        trial_steps / sequential_train,
        trial_steps / vectorized_train,
        sequential_train / vectorized_train,
        f"{alone[0].metrics['compile_seconds']:.1f} / {together[0].metrics['compile_seconds']:.1f}",
        f"{loss_gap:.1e}, {'equal' if same_accuracy else 'DIFFERENT'}",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vectorized", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K=2, 3 steps of 8 rows, 8 test reviews: a smoke run")
    parser.add_argument("--ks", type=int, nargs="+", help="group sizes K (default 2 4 8; quick 2)")
    parser.add_argument("--steps", type=int, help="train.total_steps of every trial (default 60; quick 3)")
    parser.add_argument("--eval-examples", type=int, help="test reviews evaluated per trial (default 128; quick 8)")
    args = parser.parse_args(argv)
    args.ks = args.ks or ([2] if args.quick else [2, 4, 8])
    args.steps = args.steps or (3 if args.quick else 60)
    args.eval_examples = args.eval_examples or (8 if args.quick else 128)

    with tempfile.TemporaryDirectory(prefix="vectorized_benchmark_") as tmp:
        folder = Path(tmp)
        sample = trial_configs(max(args.ks), args, folder / "sample")
        print_header(
            "K trials vectorised (one vmapped program) against the same K trials one by one",
            [
                f"tiny preset, {args.steps} steps of {sample[0].train.batch_size} rows x {sample[0].data.seq_len} "
                f"tokens per trial, lr in [2e-4, 2e-3], ratio 1.0/0.5, eval on {args.eval_examples} test reviews",
                "trials/hour: whole trials (data, model, compile, train, eval); train trial-steps/s: compile + steps",
            ],
        )
        warm_up(sample, folder)
        rows = [measure(k, args, folder) for k in args.ks]
    print_table(
        rows,
        ["K", "sequential trials/h", "vectorised trials/h", "ratio (wall)", "seq train trial-steps/s",
         "vec train trial-steps/s", "ratio (train)", "compile s seq / vec", "max rel final-loss gap, test acc"],
    )


if __name__ == "__main__":
    main()
