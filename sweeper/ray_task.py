"""What a Ray worker runs for one trial of the Ray launcher (sweeper/ray_launch.py).

The worker may be on another machine, with no view of the launching machine's files: the sweep's
state arrives as an argument and is written into the worker's own sweep folder for the app to
read; the trial runs as a Hydra job there, exactly as with the basic launcher; its outcome travels
back in the task's return value, and the launcher writes it into the sweep folder it reads.

Process 0 of a trial (the only one, unless the trial spans several hosts) runs the sweeper's app:
it opens the child run, trains, logs and writes outputs. Other processes of a multi-host trial
only train and evaluate alongside it (trainer.distributed). A retried trial first closes the
child run its lost attempt left RUNNING.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper import state

# sweeper.status of an attempt whose worker was lost, as sweeper.liveness tags a stale run: a
# later attempt may resume it from its checkpoint (trainer/resume.py).
LOST = "interrupted"


@dataclass
class TrialTask:
    """One process's share of one trial, as shipped to a Ray worker."""

    hydra_context: Any
    config: DictConfig  # the job's config, as Hydra's launchers build it (hydra.job.num set)
    task_function: Callable[[DictConfig], Any]
    sweep: dict  # the SweepState, as asdict
    group: Any = None  # trainer.distributed.ProcessGroup of a multi-host trial, else None
    worker_dir: Optional[str] = None  # hydra.launcher.worker_dir: where the job's folders go on the worker

    @property
    def number(self) -> int:
        return int(self.config.hydra.job.num) + 1


@dataclass
class TaskReturn:
    job_return: Any  # hydra.core.utils.JobReturn
    outcome: Optional[dict]  # the trial's state.Outcome, as asdict; None if the job wrote none


def run_task(task: TrialTask) -> Optional[TaskReturn]:
    """Run the trial's Hydra job (process 0) or train alongside it (other processes)."""
    if task.group is not None:
        from trainer.distributed import initialize

        initialize(task.group)  # before anything touches JAX
        if not task.group.is_leader:
            run_follower(task)
            return None
    from hydra.core.utils import configure_log, run_job, setup_globals

    setup_globals()
    configure_log(task.config.hydra.hydra_logging, task.config.hydra.verbose)
    sweep = state.SweepState(**task.sweep)
    sweep_dir = enter_launch_dir(task.config, task.worker_dir)
    write_state_once(sweep_dir, sweep)
    try:
        close_lost_attempts(sweep, task.number, LOST, "the Ray worker running this attempt was lost; the trial ran again")
    except Exception as error:  # the store is away: the app's own retries deal with it
        print(f"warning: could not look up earlier attempts of trial {task.number}: {error}", flush=True)
    job_return = run_job(
        hydra_context=task.hydra_context, task_function=task.task_function, config=task.config,
        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
    )
    outcomes = [o for o in state.read_summary(sweep_dir, 0).outcomes if o.trial == task.number]
    return TaskReturn(job_return=job_return, outcome=asdict(outcomes[0]) if outcomes else None)


def run_follower(task: TrialTask) -> None:
    """A process other than 0: the same trial config, trained and evaluated, nothing kept."""
    from trainer.distributed import run_process

    from sweeper.config import trial_dict

    values = trial_dict(task.config, output_dir=False)
    values["output_dir"] = "unused"  # trainer.distributed gives each follower a scratch folder
    run_process(OmegaConf.create(values), task.group)


def enter_launch_dir(config: DictConfig, worker_dir: Optional[str] = None) -> Path:
    """Work in `worker_dir`, else the launch directory's path on this machine (created if need be;
    a temporary folder if it can't be). Returns the sweep folder there, as the app computes it
    (hydra.runtime.cwd / hydra.sweep.dir); a relative hydra.sweep.dir lands inside it."""
    launch_dir = Path(worker_dir or str(config.hydra.runtime.cwd)).expanduser().absolute()
    try:
        launch_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(launch_dir)
    except OSError:
        launch_dir = Path(tempfile.mkdtemp(prefix="llm-sweeper-"))
        os.chdir(launch_dir)
    if str(launch_dir) != str(config.hydra.runtime.cwd):
        with open_dict(config):
            config.hydra.runtime.cwd = str(launch_dir)
    return launch_dir / str(config.hydra.sweep.dir)


def write_state_once(sweep_dir: Path, sweep: state.SweepState) -> None:
    """The sweep's state file in this machine's sweep folder, left alone when it already holds this sweep.

    Not state.write_state: on a shared filesystem that would drop the outcomes other trials wrote.
    """
    try:
        if state.read_state(sweep_dir) == sweep:
            return
    except (OSError, ValueError, TypeError):
        pass
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / state.STATE_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(sweep), indent=1, allow_nan=True))
    os.replace(tmp, path)


def close_lost_attempts(sweep: state.SweepState, trial: int, status: str, message: str) -> list[str]:
    """End the child runs of `trial` in this sweep still RUNNING (their worker died): KILLED, tagged.

    Returns their run ids. Called by a retried attempt before it opens its own run, and by the
    launcher when a trial's last attempt was lost.
    """
    from sweeper import tracking

    client = tracking.MlflowClient(tracking_uri=sweep.tracking_uri)
    runs = client.search_runs(
        [sweep.experiment_id],
        filter_string=(
            f"tags.`sweeper.sweep_id` = '{sweep.parent_run_id}' AND tags.`sweeper.trial` = '{trial}' "
            "AND attributes.status = 'RUNNING'"
        ),
    )
    for run in runs:  # as sweeper.liveness closes a run whose process is gone
        client.set_tag(run.info.run_id, "sweeper.error", message[: tracking.MAX_TAG_CHARS])
        client.set_tag(run.info.run_id, "sweeper.status", status)
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in runs]


def coordinator_address() -> str:
    """host:port where process 0 of a multi-host trial can serve JAX's coordination: this node's IP, a free port."""
    import socket

    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"
