"""A trial over several hosts under the Ray launcher: a placement group, a coordinator, one process per host.

States: reserving (the placement group, or the TPU slice, is not ready yet), probing (host 0
picks the coordinator's address), running (one task per bundle, process 0 the leader). The
processes live and die together: when one is lost, the rest are cancelled, the hosts released,
and the whole trial starts again, up to hydra.launcher.max_retries times. When the
leader returns (trained, skipped or failed), followers still waiting on it are cancelled. A
process that raises (rather than being lost) ends the trial as failed, without a retry.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from trainer.distributed import ProcessGroup

from sweeper.ray_task import coordinator_address


class Gang:
    def __init__(self, launch, job) -> None:
        self.launch, self.job, self.settings = launch, job, launch.settings
        self.slice = None  # ray.util.tpu.SlicePlacementGroup of a TPU trial
        self.group = None  # the placement group
        self.refs: list[Any] = []  # what this attempt waits on
        self.leader: Any = None  # process 0's task of this attempt
        self.deadline: Optional[float] = None
        self.done = False

    # ------------------------------------------------------------------ hosts
    def reserve(self):
        """The placement group of this attempt's hosts (reserved asynchronously)."""
        from ray.util.placement_group import placement_group

        s = self.settings
        if s.tpu_topology:
            from ray.util.tpu import SlicePlacementGroup

            self.slice = SlicePlacementGroup(topology=s.tpu_topology, accelerator_version=s.tpu_version,
                                             name=f"trial-{self.job.number}")
            return self.slice.placement_group
        return placement_group([self.settings.bundle()] * s.hosts, strategy=s.placement_strategy,
                               name=f"trial-{self.job.number}")

    @property
    def hosts(self) -> int:
        return self.slice.num_hosts if self.slice is not None else self.settings.hosts

    def task_options(self, bundle: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=bundle)
        if self.slice is not None:  # as ray.util.tpu.run_on_slice places its tasks
            chips = self.slice.bundle_resources.get("TPU", self.slice.devices_per_host)
            return {"num_cpus": 0, "resources": {"TPU": chips}, "scheduling_strategy": strategy}
        s = self.settings
        return {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "resources": s.custom_resources() or None,
                "scheduling_strategy": strategy}

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.slice is not None:
            self.slice.shutdown()
        elif self.group is not None:
            remove_placement_group(self.group)
        self.slice = self.group = None

    # ------------------------------------------------------------------ states
    def start(self) -> None:
        """Reserve the hosts for a new attempt."""
        self.job.attempts += 1
        try:
            self.group = self.reserve()
        except Exception as error:  # e.g. no TPU slice of that topology became free in time
            return self.failed(error)
        self.deadline = time.monotonic() + self.settings.placement_timeout
        self.wait(self.group.ready(), self.on_reserved)

    def wait(self, ref, handler) -> None:
        self.refs.append(ref)
        self.launch.waiting[ref] = handler

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            import ray

            error = TimeoutError(
                f"{self.hosts} host(s) of {self.settings.bundle()} were not free within "
                f"hydra.launcher.placement_timeout={self.settings.placement_timeout:g}s "
                f"(available: {ray.available_resources()}); add nodes or lower hydra.launcher.hosts"
            )
            self.deadline = None
            self.stop()
            self.job.attempts = self.settings.max_retries + 1  # waiting longer would not help
            self.give_up(error)

    def on_reserved(self, value, error) -> None:
        self.deadline = None
        if error is not None:
            return self.failed(error)
        if self.slice is not None:
            self.slice.release_head_pgs()  # the slice is held by its worker bundles now
        import ray

        probe = ray.remote(coordinator_address).options(num_cpus=0, **{
            k: v for k, v in self.task_options(0).items() if k == "scheduling_strategy"
        }).remote()
        self.wait(probe, self.on_coordinator)

    def on_coordinator(self, address, error) -> None:
        if error is not None:
            return self.failed(error)
        launch = self.launch
        for rank in range(self.hosts):
            group = ProcessGroup(coordinator=address, num_processes=self.hosts, process_id=rank)
            ref = launch.remote_fresh.options(
                name=f"trial-{self.job.number}-process-{rank}", max_retries=0, **self.task_options(rank)
            ).remote(launch.task(self.job, group))
            if rank == 0:
                self.leader = ref
            self.wait(ref, self.on_leader if rank == 0 else self.on_follower)

    def on_leader(self, value, error) -> None:
        if error is not None:
            return self.failed(error)
        self.stop()  # followers still running wait for a leader that is gone
        self.done = True
        self.launch.finish(self.job, value, None)

    def on_follower(self, value, error) -> None:
        if error is None:
            return
        import ray

        if self.leader is not None and ray.wait([self.leader], timeout=0)[0]:
            # The leader returned too (a follower may die as the leader's process exits): its result counts.
            self.launch.waiting.pop(self.leader, None)
            try:
                value, error = ray.get(self.leader), None
            except ray.exceptions.RayError as raised:
                value, error = None, raised
            return self.on_leader(value, error)
        self.failed(error)

    # ------------------------------------------------------------------ failures
    def stop(self) -> None:
        """Cancel what this attempt still waits on and free its hosts."""
        import ray

        for ref in self.refs:
            if self.launch.waiting.pop(ref, None) is not None:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # e.g. a placement group's ready(), which is no task to cancel
                    pass
        self.refs, self.leader = [], None
        self.release()

    def failed(self, error: Exception) -> None:
        """One process (or the reservation) failed: stop the attempt, then retry or record the failure.

        Retried only when a process was lost (its worker or node died); an exception a process
        raised would be raised again.
        """
        import ray

        if self.done:
            return
        self.stop()
        if self.job.attempts <= self.settings.max_retries and not isinstance(error, ray.exceptions.RayTaskError):
            print(f"trial {self.job.number}: attempt {self.job.attempts} lost ({type(error).__name__}); "
                  "starting it again on fresh hosts", flush=True)
            self.start()
        else:
            self.give_up(error)

    def give_up(self, error: Exception) -> None:
        self.done = True
        self.launch.finish(self.job, None, error)
