"""Tracking writes that survive a tracking store going away: journaled first, sent in order.

Every write of a run (params, metrics, tags, artifacts, its end) is appended to
`tracking_outbox.jsonl` in the trial's own folder before it is sent; `tracking_outbox.sent`
counts the writes the store acknowledged. While the store is away, training goes on and the
writes wait; at the end of a trial the outbox keeps retrying for `tracking.retry_window`
seconds. What is still unsent then stays in the folder, and the next run of a sweep from the
same directory, or `python -m sweeper.sync`, sends it. A lock file keeps two processes from
sending one outbox at once.

A write the store refuses as invalid (not as unavailable) is not retried: it is skipped,
recorded in `tracking_outbox.errors`, and reported.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

JOURNAL = "tracking_outbox.jsonl"
SENT = "tracking_outbox.sent"
META = "tracking_outbox.json"
ERRORS = "tracking_outbox.errors"
LOCK = "tracking_outbox.lock"
FILES = "tracking_files"  # texts, dicts and figures written here before they are sent as artifacts

# MLflow error codes that mean the request itself is wrong: retrying cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def is_permanent(error: BaseException) -> bool:
    return getattr(error, "error_code", None) in PERMANENT_ERRORS


def retry(call: Callable[[], Any], window: float, what: str, *, pause: float = 2.0) -> Any:
    """`call()`, retried while the store is unavailable, for up to `window` seconds in all."""
    deadline = time.monotonic() + max(window, 0.0)
    warned = False
    while True:
        try:
            return call()
        except Exception as error:
            if is_permanent(error) or time.monotonic() + pause > deadline:
                raise
            if not warned:
                print(f"warning: the tracking store did not answer ({what}: {_short(error)}); "
                      f"retrying for up to {window:.0f} s", file=sys.stderr, flush=True)
                warned = True
            time.sleep(pause)
            pause = min(pause * 1.5, 15.0)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 300 else text[:300] + " ..."


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Outbox:
    """The journaled writes of the runs logged from one folder (a trial's, or the sweep's)."""

    def __init__(self, folder: Path, uri: str, window: float, *, client=None) -> None:
        from mlflow import MlflowClient

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri, self.window = uri, float(window)
        self.client = client or MlflowClient(tracking_uri=uri)
        meta = self.folder / META
        if not meta.is_file():
            _write_atomic(meta, json.dumps({"uri": uri, "created": time.time()}))
        self.sent = self._read_sent()
        self.queued = self._count_queued()
        self.away_since: Optional[float] = None
        self._lock_file = None

    # ------------------------------------------------------------ journal

    def _read_sent(self) -> int:
        try:
            return int((self.folder / SENT).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _count_queued(self) -> int:
        path = self.folder / JOURNAL
        if not path.is_file():
            return 0
        return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())

    def _append(self, op: dict) -> None:
        with open(self.folder / JOURNAL, "a") as journal:
            journal.write(json.dumps(op, allow_nan=True) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self.queued += 1

    def _ops(self) -> list[dict]:
        path = self.folder / JOURNAL
        ops = []
        for line in path.read_bytes().split(b"\n") if path.is_file() else []:
            if line.strip():
                try:
                    ops.append(json.loads(line))
                except ValueError:  # a line cut short by a crash mid-write: nothing after it was acknowledged
                    break
        return ops

    @property
    def unsent(self) -> int:
        return max(self.queued - self.sent, 0)

    # ------------------------------------------------------------ writes

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """metrics: (key, value, timestamp_ms, step); params and tags: (key, value)."""
        self._append({"op": "log_batch", "run_id": run_id, "metrics": [list(m) for m in metrics],
                      "params": [list(p) for p in params], "tags": [list(t) for t in tags]})

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._append({"op": "set_tag", "run_id": run_id, "key": key, "value": str(value)})

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._append({"op": "log_artifact", "run_id": run_id, "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def log_text(self, run_id: str, text: str, name: str) -> None:
        """`text` as the artifact `name` (a file written into this folder first)."""
        path = self.folder / FILES / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.log_artifact(run_id, path, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def log_dict(self, run_id: str, values: dict, name: str) -> None:
        self.log_text(run_id, json.dumps(values, indent=1), name)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        path = self.folder / FILES / name
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        self.log_artifact(run_id, path)

    def set_terminated(self, run_id: str, status: str) -> None:
        self._append({"op": "set_terminated", "run_id": run_id, "status": status,
                      "end_time": int(time.time() * 1000)})

    # ------------------------------------------------------------ sending

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        c, run_id = self.client, op["run_id"]
        if op["op"] == "log_batch":
            c.log_batch(run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in op["metrics"]],
                        params=[Param(k, v) for k, v in op["params"]], tags=[RunTag(k, v) for k, v in op["tags"]])
        elif op["op"] == "set_tag":
            c.set_tag(run_id, op["key"], op["value"])
        elif op["op"] == "log_artifact":
            if not Path(op["path"]).is_file():
                raise FileNotFoundError(f"{op['path']} (an artifact of run {run_id}) is gone")
            c.log_artifact(run_id, op["path"], artifact_path=op.get("artifact_path"))
        elif op["op"] == "set_terminated":
            c.set_terminated(run_id, op["status"], end_time=op["end_time"])
        else:
            raise ValueError(f"unknown outbox op {op['op']!r}")

    def lock(self) -> bool:
        """Hold this outbox's send lock (released when the process ends); False if another holds it."""
        if self._lock_file is not None:
            return True
        handle = open(self.folder / LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def send(self, block: bool = False) -> int:
        """Send the unsent writes in order; returns how many are left.

        block=False tries once (a trial mid-training never waits); block=True retries while the
        store is away, until `window` seconds have passed since it went away.
        """
        if not self.unsent or not self.lock():
            return self.unsent
        ops = self._ops()
        pause = 2.0
        while self.sent < len(ops):
            try:
                self._apply(ops[self.sent])
            except Exception as error:
                if is_permanent(error) or isinstance(error, (FileNotFoundError, ValueError)):
                    self._skip(ops[self.sent], error)
                    continue
                now = time.monotonic()
                if self.away_since is None:
                    self.away_since = now
                    print(f"warning: the tracking store at {self.uri} did not answer ({_short(error)}); "
                          f"{self.unsent} write(s) kept in {self.folder / JOURNAL}", file=sys.stderr, flush=True)
                if not block or now - self.away_since + pause > self.window:
                    return self.unsent
                time.sleep(pause)
                pause = min(pause * 1.5, 15.0)
                continue
            self.away_since, pause = None, 2.0
            self.sent += 1
            _write_atomic(self.folder / SENT, str(self.sent))
        return self.unsent

    def _skip(self, op: dict, error: BaseException) -> None:
        with open(self.folder / ERRORS, "a") as errors:
            errors.write(json.dumps({"op": op, "error": _short(error), "at": time.time()}) + "\n")
        print(f"warning: the tracking store refused a {op['op']} of run {op.get('run_id')}: {_short(error)} "
              f"(kept in {self.folder / ERRORS})", file=sys.stderr, flush=True)
        self.sent += 1
        _write_atomic(self.folder / SENT, str(self.sent))


def pending_outboxes(folders: list[Path]) -> list[Path]:
    """Folders under `folders` whose outbox has writes not yet acknowledged."""
    found = []
    for top in folders:
        if not top.is_dir():
            continue
        for journal in sorted(top.rglob(JOURNAL)):
            folder = journal.parent
            box_sent = folder / SENT
            try:
                sent = int(box_sent.read_text().strip() or 0) if box_sent.is_file() else 0
            except ValueError:
                sent = 0
            queued = sum(1 for line in journal.read_bytes().split(b"\n") if line.strip())
            if queued > sent:
                found.append(folder)
    return found


def open_existing(folder: Path, window: float) -> Outbox:
    meta = json.loads((folder / META).read_text())
    return Outbox(folder, meta["uri"], window)


__all__ = ["Outbox", "open_existing", "pending_outboxes", "retry"]
