"""One trial over several JAX processes, one per host: `jax.distributed`, then `run_trial` on each.

Every process trains (the step's collectives need all of them) and evaluates (the weights are
sharded over every host's devices); only process 0 keeps what it writes and returns a result.
The others write into a scratch folder that is deleted afterwards. The sweeper's Ray launcher
starts one such process per host of a placement group (sweeper/ray_launch.py); by hand, run on
every host:

    python -m trainer.distributed --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 0 lr=2e-4 ...

On a CPU the processes talk through gloo, so the same path runs as local processes (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.config import ConfigError


@dataclass(frozen=True)
class ProcessGroup:
    """The JAX processes of one trial: where process 0 listens, how many, and which one this is."""

    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"coordinator={self.coordinator!r} must be host:port of process 0, e.g. 10.0.0.2:8476"
            )
        if self.num_processes < 1:
            raise ConfigError(f"num_processes={self.num_processes} must be >= 1, one per host")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"process_id={self.process_id} must be in 0..{self.num_processes - 1} (num_processes={self.num_processes})"
            )

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


_initialized: Optional[ProcessGroup] = None


def initialize(group: ProcessGroup) -> None:
    """Join this process to `group` (jax.distributed.initialize); call it before JAX computes anything.

    A process joins one group in its life: JAX cannot leave one, so a second, different group fails.
    """
    global _initialized
    if group.num_processes == 1:
        return  # nothing to join: the plain single-process path
    if _initialized is not None:
        if _initialized != group:
            raise RuntimeError(
                f"this process already joined {_initialized}; a process runs one multi-host trial "
                "(the Ray launcher starts a fresh worker for each)"
            )
        return
    import jax

    from trainer.hostmem import jax_runs_on_cpu

    if jax_runs_on_cpu():
        # XLA's CPU client has no cross-process collectives of its own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=group.coordinator, num_processes=group.num_processes, process_id=group.process_id
    )
    _initialized = group


def follower_config(cfg, scratch: str):
    """The trial a process other than 0 runs: the same one, writing into `scratch`, no predictions."""
    return dataclasses.replace(cfg, output_dir=scratch, eval=dataclasses.replace(cfg.eval, predictions=False))


def run_process(cfg: Any, group: ProcessGroup, callback: Optional[Callable] = None):
    """This process's part of the trial: process 0 returns its TrialResult, the others None."""
    from trainer.config import to_trial_config
    from trainer.trial import run_trial

    initialize(group)
    if group.is_leader:
        return run_trial(cfg, callback=callback)
    with tempfile.TemporaryDirectory(prefix="llm-sweeper-follower-") as scratch:
        run_trial(follower_config(to_trial_config(cfg), scratch))
    return None


def compose_trial(overrides: list[str], output_dir: str):
    """conf/config.yaml with Hydra overrides, as `python -m trainer` composes it, writing to output_dir."""
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={output_dir}"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.distributed",
        description="Run this host's process of a multi-host trial; process 0 prints the result as JSON.",
    )
    parser.add_argument("--coordinator", required=True, help="host:port of process 0, e.g. 10.0.0.2:8476")
    parser.add_argument("--num-processes", type=int, required=True, help="one process per host")
    parser.add_argument("--process-id", type=int, required=True, help="0 on the coordinator's host")
    parser.add_argument("--output-dir", default="outputs/distributed", help="where process 0 writes predictions")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, e.g. lr=2e-4")
    args = parser.parse_args(argv)
    try:
        group = ProcessGroup(args.coordinator, args.num_processes, args.process_id)
        result = run_process(compose_trial(args.overrides, args.output_dir), group)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        import jax

        print(json.dumps({
            "status": result.status, "losses": [record.loss for record in result.history], "metrics": result.metrics,
            "processes": jax.process_count(), "devices": jax.device_count(),
        }))
    return 0


if __name__ == "__main__":
    from trainer.hostmem import tune_malloc

    tune_malloc()
    sys.exit(main())
