"""The Ray launcher's work: each trial a Ray task (or, across hosts, a gang of tasks), results by value.

    python -m sweeper -m sweep=quick_cpu hydra/launcher=ray                                 # a Ray started here
    python -m sweeper -m sweep=reference hydra/launcher=ray hydra.launcher.address=auto tracking=server

The launcher (hydra_plugins/ray_launcher) hands every job of the sweep to `launch_sweep`, which
connects to Ray (or starts one on 127.0.0.1 for the sweep, stopped at its end), submits one task
per trial with the trial's resources (hydra.launcher.num_cpus, num_gpus, resources), and waits.
A task runs the trial as a Hydra job on its worker (sweeper/ray_task.py) and returns the job's
result and outcome, which are written into this machine's sweep folder: no shared filesystem is
needed. Ray runs a trial again when its worker or node is lost (max_retries); a trial whose
last attempt is lost is recorded failed, its run closed, and the sweep goes on.

A trial over several hosts (hosts > 1, or a TPU slice) reserves a placement group, one bundle
per host (ray.util.tpu's slice placement group for a TPU slice), asks host 0 for a coordinator
address and starts one JAX process per bundle (trainer.distributed). Its processes succeed or
fail together: when one is lost the others are cancelled and the whole trial is retried.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from sweeper import expand, state, tracking
from sweeper.ray_task import LOST, TaskReturn, TrialTask, close_lost_attempts, run_task

if TYPE_CHECKING:
    from sweeper.ray_gang import Gang

STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")
LAUNCHER_TARGET = "hydra_plugins.ray_launcher.ray_launcher.RayLauncher"


class LaunchError(ValueError):
    """A launcher setting that cannot work; the message names it and the fix."""


@dataclass
class RaySettings:
    """hydra.launcher's keys (see RayLauncherConf), checked."""

    address: Optional[str] = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_tpus: float = 0.0
    resources: dict = field(default_factory=dict)
    hosts: int = 1
    placement_strategy: str = "STRICT_SPREAD"
    tpu_topology: Optional[str] = None
    tpu_version: Optional[str] = None
    max_retries: int = 2
    placement_timeout: float = 900.0
    local_num_cpus: Optional[int] = None
    local_object_store_memory: Optional[int] = None
    worker_dir: Optional[str] = None
    runtime_env: dict = field(default_factory=dict)

    @classmethod
    def create(cls, values: dict) -> "RaySettings":
        plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}
        if plain.get("address") in ("", "local"):
            plain["address"] = None  # Ray's own word for a new local instance
        settings = cls(**plain)
        settings.check()
        return settings

    def check(self) -> None:
        if self.hosts < 1:
            raise LaunchError(f"hydra.launcher.hosts={self.hosts} must be >= 1 (JAX processes per trial, one per host)")
        if self.max_retries < 0:
            raise LaunchError(f"hydra.launcher.max_retries={self.max_retries} must be >= 0")
        if min(self.num_cpus, self.num_gpus, self.num_tpus) < 0:
            raise LaunchError(
                f"hydra.launcher.num_cpus={self.num_cpus}, num_gpus={self.num_gpus}, num_tpus={self.num_tpus} "
                "must be >= 0 (per host of a trial)"
            )
        if self.placement_strategy not in STRATEGIES:
            raise LaunchError(
                f"hydra.launcher.placement_strategy={self.placement_strategy!r}: expected one of {', '.join(STRATEGIES)}"
            )
        if (self.tpu_topology is None) != (self.tpu_version is None):
            raise LaunchError(
                f"hydra.launcher.tpu_topology={self.tpu_topology} and tpu_version={self.tpu_version}: a TPU slice "
                "needs both, e.g. tpu_topology=2x2x2 tpu_version=v4"
            )
        if self.address is None and self.multi_host and not self.tpu_topology and self.placement_strategy == "STRICT_SPREAD":
            raise LaunchError(
                f"hydra.launcher.hosts={self.hosts} with placement_strategy=STRICT_SPREAD needs {self.hosts} nodes, "
                "but the Ray started for this sweep has one; pass hydra.launcher.address=<cluster>, or "
                "hydra.launcher.placement_strategy=PACK to run the processes on this machine"
            )

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1 or self.tpu_topology is not None

    def custom_resources(self) -> dict:
        """Ray resources besides CPUs and GPUs that a trial asks of each host."""
        return {**({"TPU": self.num_tpus} if self.num_tpus else {}), **self.resources}

    def bundle(self) -> dict:
        """What one host of a trial reserves."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.custom_resources()}


def check_launch(config: DictConfig, uri: str) -> None:
    """Before the sweep opens: the Ray launcher's settings, and no tracking store on this machine's
    disk when trials run on a Ray cluster (address set). Other launchers pass."""
    if OmegaConf.select(config, "hydra.launcher._target_", default=None) != LAUNCHER_TARGET:
        return
    values = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    values.pop("_target_", None)
    RaySettings.create(values)
    address = values.get("address")
    if address in (None, "", "local"):
        return
    if "://" not in uri or uri.startswith(("sqlite:", "file:")):
        raise tracking.TrackingError(
            f"tracking.uri={uri} is a file on this machine, which trials on the Ray cluster at "
            f"hydra.launcher.address={address} cannot reach. Start a tracking server where every node "
            "reaches it (`mlflow server --backend-store-uri sqlite:///mlflow.db --host 0.0.0.0 --port 5000`) "
            "and pass tracking=server tracking.uri=http://<its host>:5000"
        )
    host = uri.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "[::1]"):
        print(f"warning: tracking.uri={uri} is this machine's loopback: only trials on this machine's "
              f"Ray node reach it; give the server's address as other nodes see it", flush=True)


def connect(settings: RaySettings) -> bool:
    """Connect to the cluster, or start a Ray for this sweep on 127.0.0.1; True if this call did."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = settings.runtime_env or None
    if settings.address is None:
        ray.init(
            num_cpus=settings.local_num_cpus, object_store_memory=settings.local_object_store_memory,
            include_dashboard=False, runtime_env=runtime_env, _node_ip_address="127.0.0.1",
        )
    else:
        # No object_store_memory: Ray refuses it when connecting to a running cluster.
        ray.init(address=settings.address, runtime_env=runtime_env)
    return True


@dataclass
class Job:
    """One trial of the batch: its Hydra config and what the launcher knows of it."""

    number: int  # 1-based, as the app numbers trials
    overrides: list[str]
    config: DictConfig
    started: float = field(default_factory=time.perf_counter)
    attempts: int = 0
    result: Optional[TaskReturn] = None


class Launch:
    """Submits the jobs and reacts to each finished Ray object until every trial has a result."""

    def __init__(self, hydra_context, task_function, sweep: state.SweepState, sweep_dir: Path,
                 settings: RaySettings) -> None:
        import ray

        self.task_function, self.sweep, self.sweep_dir, self.settings = task_function, sweep, sweep_dir, settings
        # A job needs only the callbacks; the config loader would drag every plugin's config
        # classes along, and a worker without some plugin could not unpickle them.
        from hydra.types import HydraContext

        self.job_context = HydraContext(config_loader=None, callbacks=hydra_context.callbacks)
        self.remote = ray.remote(run_task)
        # A fresh worker per trial (it exits after one): JAX joins one process group in a process's
        # life, and a worker that held an accelerator hands it back only by exiting.
        self.remote_fresh = ray.remote(max_calls=1)(run_task)
        self.waiting: dict[Any, Callable[[Any, Optional[Exception]], None]] = {}
        self.gangs: dict[int, "Gang"] = {}

    def task(self, job: Job, group=None) -> TrialTask:
        return TrialTask(self.job_context, job.config, self.task_function, asdict(self.sweep), group,
                         self.settings.worker_dir)

    def submit(self, job: Job) -> None:
        if self.settings.multi_host:
            from sweeper.ray_gang import Gang

            self.gangs[job.number] = Gang(self, job)
            self.gangs[job.number].start()
            return
        s = self.settings
        remote = self.remote_fresh if s.num_gpus or s.custom_resources() else self.remote
        ref = remote.options(
            name=f"trial-{job.number}", num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=s.custom_resources() or None,
            max_retries=s.max_retries, retry_exceptions=False,
        ).remote(self.task(job))
        self.waiting[ref] = lambda value, error: self.finish(job, value, error)

    def finish(self, job: Job, value: Optional[TaskReturn], error: Optional[Exception]) -> None:
        """Record the trial's result, or its failure when its last attempt was lost."""
        job.result = value if error is None else None
        if error is not None:
            import ray

            if isinstance(error, ray.exceptions.RayTaskError):  # raised outside the app's own handling
                cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else error
                message = f"its Ray task raised {type(cause).__name__}: {first_line(cause)}"
            else:
                attempts = job.attempts or self.settings.max_retries + 1
                message = f"lost after {attempts} attempt(s): {type(error).__name__}: {first_line(error)}"
            try:
                closed = close_lost_attempts(self.sweep, job.number, LOST, message)
            except Exception as tracking_error:  # the store is gone too; the outcome file records it
                closed, message = [], f"{message} (and tracking failed: {tracking_error})"
            name = expand.trial_name(expand.trial_overrides(job.overrides), self.sweep.swept_keys)
            outcome = state.Outcome(trial=job.number, name=name, status="failed", message=message,
                                    run_id=closed[0] if closed else None)
            outcome.seconds = time.perf_counter() - job.started
            print(f"trial {job.number} of {self.sweep.num_trials}: failed in {outcome.seconds:.1f}s ({message})", flush=True)
        elif value is not None and value.outcome is not None:
            outcome = state.Outcome(**value.outcome)
        else:
            return  # the job wrote no outcome (preview); the summary counts what is missing
        state.write_outcome(self.sweep_dir, outcome)

    def run(self, jobs: list[Job]) -> None:
        import ray

        for job in jobs:
            self.submit(job)
        try:
            while self.waiting:
                ready, _ = ray.wait(list(self.waiting), num_returns=1, timeout=1.0)
                for gang in list(self.gangs.values()):
                    gang.check_deadline()
                for ref in ready:
                    handler = self.waiting.pop(ref, None)
                    if handler is None:
                        continue  # cancelled meanwhile
                    try:
                        value, error = ray.get(ref), None
                    except ray.exceptions.RayError as raised:
                        value, error = None, raised
                    handler(value, error)
        finally:
            for gang in self.gangs.values():
                gang.release()
            for ref in self.waiting:  # interrupted: stop what still runs
                ray.cancel(ref, force=True)


def first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def job_return(job: Job):
    """The JobReturn Hydra's sweeper reads: the task's own, or a completed job whose objective is NaN."""
    from hydra.core.utils import JobReturn, JobStatus

    if job.result is not None:
        return job.result.job_return
    return JobReturn(overrides=job.overrides, cfg=job.config, hydra_cfg=OmegaConf.create({"hydra": job.config.hydra}),
                     working_dir=str(Path.cwd()), task_name=str(job.config.hydra.job.name),
                     status=JobStatus.COMPLETED, _return_value=math.nan)


def launch_sweep(hydra_context, config: DictConfig, task_function, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int, settings: RaySettings) -> list:
    """What RayLauncher.launch does: every job as Ray task(s), waited for; the JobReturns in job order."""
    import ray
    from hydra.core.utils import configure_log, setup_globals

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.runtime.cwd)) / str(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep = state.read_state(sweep_dir)
    jobs = []
    for offset, overrides in enumerate(job_overrides):
        index = initial_job_idx + offset  # as Hydra's basic launcher numbers jobs
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = index
            sweep_config.hydra.job.num = index
        jobs.append(Job(number=index + 1, overrides=list(overrides), config=sweep_config))
    started_here = connect(settings)
    try:
        where = "a Ray started for this sweep" if settings.address is None else f"the Ray cluster at {settings.address}"
        print(f"ray launcher: {len(jobs)} trial(s) on {where}, each {settings.hosts} host(s) x {settings.bundle()}"
              + (f", TPU slice {settings.tpu_version} {settings.tpu_topology}" if settings.tpu_topology else ""), flush=True)
        Launch(hydra_context, task_function, sweep, sweep_dir, settings).run(jobs)
    finally:
        if started_here:
            ray.shutdown()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [job_return(job) for job in jobs]
