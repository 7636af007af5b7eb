"""`hydra/launcher=vectorized`: the sweep's compatible trials trained together, K at a time.

    python -m sweeper -m lr=2e-3,1e-3 ratio=0.5,1.0 hydra/launcher=vectorized hydra.launcher.group_size=4

Hydra imports this module at every start-up to discover plugins, so it imports nothing heavy;
the work is in sweeper/vectorized.py, imported when a sweep launches. (No `from __future__
import annotations`: Hydra executes this module outside sys.modules, where a dataclass with
string annotations fails to build.)
"""

from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.vectorized_launcher.vectorized_launcher.VectorizedLauncher"
    # The most trials trained in one program; 0 or 1 trains them one by one.
    group_size: int = 8


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf, provider="llm-sweeper")


class VectorizedLauncher(Launcher):
    """Runs every job of the batch in this process; compatible trials train as one vmapped program."""

    def __init__(self, group_size: int = 8) -> None:
        self.group_size = int(group_size)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        from sweeper.vectorized import launch_sweep

        return launch_sweep(
            self.hydra_context, self.config, self.task_function, job_overrides, initial_job_idx, self.group_size
        )
