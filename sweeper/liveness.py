"""Which runs are alive: heartbeats, stale runs, and claims on a trial's config.

Every run the sweeper opens carries `sweeper.host`, `sweeper.pid` and a `sweeper.heartbeat`
tag (epoch seconds) that a daemon thread refreshes. A RUNNING run is stale when its process is
gone (same host, no such pid) or its heartbeat is older than `tracking.stale_after` seconds;
the next sweep marks stale runs KILLED before it starts, so no run stays RUNNING for ever.

A child run is also the claim on its config: of two live RUNNING runs with the same config
hash, the one created first (start time, then run id) trains; the other waits for it to end,
then reuses its result or, if it did not finish, trains itself.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Optional

HEARTBEAT_TAG = "sweeper.heartbeat"
HOST_TAG = "sweeper.host"
PID_TAG = "sweeper.pid"


def liveness_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: f"{time.time():.0f}"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(run, stale_after: float, now: Optional[float] = None) -> bool:
    """A RUNNING run whose process is gone, or that has not beaten for `stale_after` seconds."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit():
        pid = int(tags[PID_TAG])
        if pid != os.getpid() and not _pid_alive(pid):
            return True
    try:
        beat = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    except ValueError:
        beat = run.info.start_time / 1000
    return (now or time.time()) - beat > stale_after


def reap_stale(client, experiment_id: str, stale_after: float) -> list[str]:
    """Mark the experiment's stale sweeper runs KILLED (tagged why); returns their ids."""
    runs = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING' AND tags.`sweeper.kind` != ''",
        max_results=5000,
    )
    reaped = []
    for run in runs:
        if not is_stale(run, stale_after):
            continue
        beat = run.data.tags.get(HEARTBEAT_TAG, "?")
        client.set_tag(run.info.run_id, "sweeper.error",
                       f"the process running it stopped without closing it (last heartbeat {beat}); "
                       "marked KILLED by a later sweep")
        if run.data.tags.get("sweeper.status", "running") == "running":
            client.set_tag(run.info.run_id, "sweeper.status", "interrupted")
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    if reaped:
        print(f"marked {len(reaped)} run(s) left RUNNING by a stopped sweep as KILLED: {', '.join(reaped)}",
              file=sys.stderr, flush=True)
    return reaped


def earlier_claim(client, experiment_id: str, digest: str, run, stale_after: float):
    """A live RUNNING run with this config hash created before `run`, or None."""
    others = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`sweeper.config_hash` = '{digest}' AND attributes.status = 'RUNNING'",
        max_results=100,
    )
    mine = (run.info.start_time, run.info.run_id)
    earlier = [
        other for other in others
        if other.info.run_id != run.info.run_id
        and other.data.tags.get("sweeper.kind") == "trial"
        and not other.data.tags.get("sweeper.linked_run_id")
        and (other.info.start_time, other.info.run_id) < mine
        and not is_stale(other, stale_after)
    ]
    return min(earlier, key=lambda r: (r.info.start_time, r.info.run_id)) if earlier else None


class Heartbeat:
    """A daemon thread that refreshes the heartbeat tag of a set of runs every `every` seconds."""

    def __init__(self, uri: str, every: float) -> None:
        self.uri, self.every = uri, max(float(every), 1.0)
        self.runs: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, run_id: str) -> None:
        with self._lock:
            self.runs.add(run_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="sweeper-heartbeat", daemon=True)
            self._thread.start()

    def discard(self, run_id: str) -> None:
        with self._lock:
            self.runs.discard(run_id)

    def _beat(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        while not self._stop.wait(self.every):
            with self._lock:
                runs = list(self.runs)
            for run_id in runs:
                try:
                    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
                except Exception:  # the store is away; the run's writes wait in its outbox
                    pass

    def stop(self) -> None:
        self._stop.set()


_heartbeats: dict[str, Heartbeat] = {}


def heartbeat(uri: str, every: float) -> Heartbeat:
    """The process's heartbeat thread for a store."""
    if uri not in _heartbeats:
        _heartbeats[uri] = Heartbeat(uri, every)
    return _heartbeats[uri]


__all__ = ["HEARTBEAT_TAG", "Heartbeat", "earlier_claim", "heartbeat", "is_stale", "liveness_tags", "reap_stale"]
