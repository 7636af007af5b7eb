"""`hydra/launcher=ray`: every trial of the sweep as a Ray task, on a local Ray or a cluster.

    python -m sweeper -m sweep=quick_cpu hydra/launcher=ray
    python -m sweeper -m sweep=reference hydra/launcher=ray hydra.launcher.address=auto tracking=server \
        hydra.launcher.tpu_topology=2x2x2 hydra.launcher.tpu_version=v4

Hydra imports this module at every start-up to discover plugins, so it imports nothing heavy
(not Ray); the work is in sweeper/ray_launch.py, imported when a sweep launches. (No `from
__future__ import annotations`: Hydra executes this module outside sys.modules, where a dataclass
with string annotations fails to build.)
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.ray_launcher.ray_launcher.RayLauncher"
    # null: start a Ray on this machine for the sweep, stopped at its end. Else an existing
    # cluster: "auto" (the one running here), "host:6379", or "ray://host:10001" (Ray Client).
    # Trials on a cluster need a tracking server they can reach: tracking=server tracking.uri=http://host:5000.
    address: Optional[str] = None
    # What one trial asks of each host it runs on.
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_tpus: float = 0.0  # TPU chips per host (Ray's "TPU" resource), e.g. 4 on a v4 host
    # Other Ray resources per host: +hydra.launcher.resources.<name>=<amount>.
    resources: Dict[str, float] = field(default_factory=dict)
    # JAX processes per trial, one per host, placed together by a Ray placement group; all
    # train, process 0 logs to MLflow. 1: a plain task.
    hosts: int = 1
    placement_strategy: str = "STRICT_SPREAD"  # of the hosts: STRICT_SPREAD, SPREAD, PACK, STRICT_PACK
    # A TPU slice per trial, reserved with ray.util.tpu (e.g. tpu_topology=2x2x2 tpu_version=v4):
    # the slice's hosts and chips replace hosts, num_tpus and resources.
    tpu_topology: Optional[str] = None
    tpu_version: Optional[str] = None
    # Times a trial runs again after its worker or node was lost; a trial that fails is not retried.
    max_retries: int = 2
    placement_timeout: float = 900.0  # seconds to wait for a multi-host trial's hosts
    # The Ray started for the sweep (address=null): its CPUs (null: all) and object store bytes.
    local_num_cpus: Optional[int] = None
    local_object_store_memory: Optional[int] = None
    # Where trials keep their folders on the workers (Hydra's sweep folder, outputs, the state
    # file), e.g. /tmp/llm-sweeper on TPU VMs; null: the launch directory's path, created on each
    # node. Outcomes and the summary come back to this machine's sweep folder either way.
    worker_dir: Optional[str] = None
    # Ray's runtime_env for the trials, e.g. {working_dir: ., env_vars: {JAX_PLATFORMS: tpu}}.
    runtime_env: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="llm-sweeper")


class RayLauncher(Launcher):
    """Submits every job of the batch to Ray and waits for all of them; results come back by value."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        from sweeper.ray_launch import RaySettings, launch_sweep

        return launch_sweep(
            self.hydra_context, self.config, self.task_function, job_overrides, initial_job_idx,
            RaySettings.create(self.settings),
        )
