"""`mlflow server` processes for tests: on 127.0.0.1, a free port, their own SQLite store; stopped
(process group) by the test that started them, and startable again on the same port and store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    def __init__(self, folder: Path, store: str | None = None) -> None:
        """`store`: a backend store URI to serve (default: its own `server.db` in `folder`)."""
        self.folder, self.port, self.process = Path(folder), free_port(), None
        self.store = store or f"sqlite:///{self.folder}/server.db"
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, boot_timeout: float = 90) -> "MlflowServer":
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
             "--artifacts-destination", str(self.folder / "server_artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + boot_timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return self
            except (urllib.error.URLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not come up:\n{(self.folder / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
