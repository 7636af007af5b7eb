"""What an N-trial sweep spends besides training: the sweeper end to end against N x one trial's training.

    python -m benchmarks.sweep_overhead [--quick] [--trials 4] [--steps 40 | --full] [--fresh-cache]

Runs `python -m sweeper -m lr=a,b,... train.total_steps=S` (tiny model, default eval) in a
subprocess with a temporary MLflow store, twice: first with an empty XLA compilation cache (a
first sweep on a machine), then again with the cache the first run filled (a later sweep, a
resumed one, a joblib worker). Each time it reads each trial's logged seconds (data_seconds,
model_seconds, eval_before_seconds, compile_seconds, train_seconds, eval_seconds, wall_seconds)
and run times back from the store. The reference is the same trial's train loop alone:
run_trial in this process with evaluation off, twice, the second time with the step compiled.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--reference-worker" in sys.argv:
    # The reference runs in a process set up as `python -m sweeper` sets up its own.
    from trainer.hostmem import tune_malloc

    tune_malloc()

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, cpu_count, data_config, print_header, print_table

# Trial metrics that time a phase of run_trial (trainer/trial.py), in the order they happen.
PHASES = (
    ("data prep", "data_seconds"),
    ("model init", "model_seconds"),
    ("eval before training", "eval_before_seconds"),
    ("compilation (first step)", "compile_seconds"),
    ("training (steps 2..S)", "train_seconds"),
    ("eval after training", "eval_seconds"),
)


def learning_rates(trials: int) -> list[str]:
    """Distinct learning rates, one per trial, so every trial is a new config (no resume skip)."""
    return [f"{lr:.3g}" for lr in np.geomspace(2e-4, 2e-3, trials)]


def trial_overrides(args) -> list[str]:
    """Overrides every trial shares (and the reference run reuses)."""
    overrides = ["model=tiny"] + ([] if args.full else [f"train.total_steps={args.steps}"])
    if args.quick:
        overrides += ["train.batch_size=8", "eval.max_examples=16", "eval.splits=[test]"]
    return overrides


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "LLM_SWEEPER_CACHE": str(cache_dir)}
    cfg = data_config()
    if not env.get(cfg.env_var) and cfg.path:
        env[cfg.env_var] = cfg.path
    return env


def cache_without_programs(folder: Path, fresh: bool) -> Path:
    """A cache folder for the sweeps: empty (fresh), or a copy of the usual one without its XLA programs."""
    from trainer.tokenizer import expand_cache_dir

    cache = folder / "cache"
    usual = expand_cache_dir(data_config().cache_dir)
    if not fresh and usual.is_dir():
        shutil.copytree(usual, cache, ignore=lambda where, names: ["xla"] if Path(where) == usual else [])
    cache.mkdir(exist_ok=True)
    return cache


def run_sweep(args, folder: Path, env: dict[str, str], name: str) -> tuple[float, str, list[str]]:
    """(wall seconds, tracking uri, command) of sweep `name`; exits on a failed sweep.

    Every sweep logs into one store, folder/mlflow.db, each into an experiment of its own (so
    the resume rule skips nothing): a later sweep opens the store a first one created.
    """
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "sweeper", "-m", f"lr={','.join(learning_rates(args.trials))}",
        *trial_overrides(args), f"tracking.uri={uri}", f"tracking.experiment=benchmark-{name}",
        f"hydra.sweep.dir={folder / name}", f"sweep_name={name}",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(f"the sweep exited {result.returncode}:\n{' '.join(command)}\n"
              f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}", file=sys.stderr)
        sys.exit(1)
    return wall, uri, command


def trial_runs(uri: str, experiment: str) -> list:
    """The child runs (those with a parent) of one experiment, in trial order."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([found.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if found else []

    def order(run):
        return int(run.data.tags.get("sweeper.trial", 0)), run.info.start_time

    return sorted(runs, key=order)


def reference_in_subprocess(args, folder: Path, env: dict[str, str]) -> dict[str, float]:
    """reference_training in a fresh process with the sweeper's malloc settings and the same cache."""
    command = [sys.executable, "-m", "benchmarks.sweep_overhead", "--reference-worker", f"--steps={args.steps}",
               f"--trials={args.trials}", *(["--full"] if args.full else []), *(["--quick"] if args.quick else [])]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"the reference run exited {result.returncode}:\n{result.stderr[-3000:]}", file=sys.stderr)
        sys.exit(1)
    return json.loads(result.stdout.strip().splitlines()[-1])


def reference_training(args, folder: Path, lr: str) -> dict[str, float]:
    """The first trial's train loop alone: run_trial without evaluation, compiled, then timed."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs
    from trainer.trial import run_trial

    register_configs()
    overrides = [
        *trial_overrides(args), f"lr={lr}", "eval.splits=[]", "eval.before_training=false",
        "eval.predictions=false", f"output_dir={folder / 'reference'}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cold = run_trial(cfg).metrics
    warm = run_trial(cfg).metrics  # the step compiled above is reused (make_train_step is cached)
    return {
        "compile": cold["compile_seconds"],
        # train_loop times step 1 apart; warm, that is one compiled step.
        "train": warm["compile_seconds"] + warm["train_seconds"],
        "tokens_per_second": warm["tokens_per_second"],
    }


def report(args, label: str, wall: float, runs: list, reference: dict[str, float]) -> float:
    """Print one sweep's tables; returns wall / (N x pure training) and wall / the sweep's own steps."""
    print(f"-- {label}")
    if len(runs) != args.trials:
        print(f"expected {args.trials} trial runs in the store, found {len(runs)}", file=sys.stderr)
        sys.exit(1)

    rows, totals = [], {metric: 0.0 for _, metric in PHASES}
    run_seconds_total = tracking_total = other_total = steps_total = 0.0
    for number, run in enumerate(runs, start=1):
        metrics = run.data.metrics
        run_seconds = (run.info.end_time - run.info.start_time) / 1000.0
        phases = [metrics.get(metric, 0.0) for _, metric in PHASES]
        trial_wall = metrics.get("wall_seconds", 0.0)
        tracking = run_seconds - trial_wall  # params, config, step batches, final metrics, artifacts
        other = trial_wall - sum(phases)  # state, sharding, Python between the phases
        for (_, metric), value in zip(PHASES, phases):
            totals[metric] += value
        run_seconds_total += run_seconds
        steps = metrics.get("steps", 0.0)
        # Steps 2..S at their measured pace, and step 1 at the same pace (its time is compile + run).
        steps_total += metrics.get("train_seconds", 0.0) * steps / max(steps - 1.0, 1.0)
        tracking_total += tracking
        other_total += other
        rows.append([number, run.data.params.get("lr", "?"), run_seconds, trial_wall, *phases, tracking, other])
    print_table(
        rows,
        ["trial", "lr", "run s", "run_trial s", *(name for name, _ in PHASES), "tracking", "other in trial"],
        title="per trial (seconds; run s = the MLflow child run's end - start, run_trial s = wall_seconds)",
    )

    startup = wall - run_seconds_total  # interpreter, imports, Hydra, store, parent run, summary
    shares = [
        ["startup, teardown, between trials", startup],
        *[[name, totals[metric]] for name, metric in PHASES],
        ["tracking (MLflow) around run_trial", tracking_total],
        ["other in run_trial", other_total],
    ]
    print_table(
        [[name, value, f"{100 * value / wall:.1f}%"] for name, value in shares] + [["total (subprocess wall)", wall, "100%"]],
        ["where the sweep's time went", "seconds", "share"],
    )
    pure = args.trials * reference["train"]
    print_table(
        [
            ["one trial's train loop alone (compiled, no tracking)", reference["train"]],
            ["... its compilation, cold process", reference["compile"]],
            [f"N x pure training (N={args.trials})", pure],
            ["sweep's own training time (sum of compile + train seconds)",
             totals["compile_seconds"] + totals["train_seconds"]],
            ["sweep total (subprocess wall)", wall],
        ],
        ["reference", "seconds"],
    )
    print(f"sweep wall / (N x pure training) = {wall / pure:.2f}x; training is {100 * pure / wall:.1f}% "
          f"of the sweep (reference loop {reference['tokens_per_second']:,.0f} tokens/s)")
    print(f"sweep wall / its own training steps ({steps_total:.1f} s, every step at its trial's pace) = "
          f"{wall / steps_total:.2f}x\n")
    return wall / pure, wall / steps_total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 trials of 3 steps, 16 test reviews: a smoke run")
    parser.add_argument("--trials", type=int, help="trials in the sweep (default 4; quick 2)")
    parser.add_argument("--steps", type=int, help="train.total_steps of each trial (default 40; quick 3)")
    parser.add_argument("--full", action="store_true", help="trials as long as the preset's (train.epochs), not --steps")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="an empty LLM_SWEEPER_CACHE: count tokenizer training and tokenization too")
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.trials = args.trials or (2 if args.quick else 4)
    args.steps = args.steps or (3 if args.quick else 40)
    if args.reference_worker:  # run by reference_in_subprocess, in its temporary folder
        print(json.dumps(reference_training(args, Path.cwd(), learning_rates(args.trials)[0])))
        return

    with tempfile.TemporaryDirectory(prefix="sweep_overhead_") as tmp:
        folder = Path(tmp)
        cache_dir = cache_without_programs(folder, args.fresh_cache)
        env = subprocess_env(cache_dir)
        sweeps = []
        for name in ("cold", "warm"):
            wall, uri, command = run_sweep(args, folder, env, name)
            sweeps.append((name, wall, trial_runs(uri, f"benchmark-{name}")))
            if name == "cold":  # between the sweeps, so a drift in the machine's speed shows
                reference = reference_in_subprocess(args, folder, env)

    length = "the preset's length (train.epochs)" if args.full else f"{args.steps} steps"
    print_header(
        f"sweep overhead: {args.trials} trials of {length} (tiny model) through the sweeper",
        [
            f"command: {' '.join(Path(c).name if c == sys.executable else c for c in command)}",
            f"cache: {'fresh (tokenizer trained, splits tokenized)' if args.fresh_cache else 'a copy of the usual one'}; "
            f"{cpu_count()} cores",
        ],
    )
    labels = {
        "cold": "first sweep: empty XLA compilation cache (every program compiled), new MLflow store",
        "warm": "the same sweep again: programs from the compilation cache the first run filled, the store it created",
    }
    ratios = {name: report(args, labels[name], wall, runs, reference) for name, wall, runs in sweeps}
    print(f"sweep wall / (N x pure training): cold compilation cache {ratios['cold'][0]:.2f}x, "
          f"warm {ratios['warm'][0]:.2f}x; sweep wall / its own training steps: cold {ratios['cold'][1]:.2f}x, "
          f"warm {ratios['warm'][1]:.2f}x")


if __name__ == "__main__":
    main()
