"""Helpers for tests that start real servers on 127.0.0.1 (TensorBoard, MLflow, torch.distributed).

Import with `from servers import ...` (pytest puts tests/ on sys.path; tests/ is no package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, deadline: float):
    """GET a JSON answer, retrying until `deadline` (time.monotonic) while the server starts."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def start_tensorboard(logdir: Path, port: int, *flags: str) -> subprocess.Popen:
    """A real `tensorboard` process; the caller terminates it in `finally`."""
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    return subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group, so the test kills only it."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("mlflow")
        if exe is None:
            import pytest

            pytest.skip("the `mlflow` command is not on PATH")
        cmd = [
            exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.tmp}/server.db",
            "--artifacts-destination", str(self.tmp / "server-art"),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
        with open(self.tmp / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        # Generous: a busy 2-core CI machine took over 40 s to import and start mlflow. A server
        # that exits (a bad flag, a taken port) fails at once; only a live, silent one waits.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        code = self.proc.poll()
        self.stop()
        what = f"exited with {code}" if code is not None else "was not healthy within 180 s"
        log = (self.tmp / "server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server {what}:\n{log}")

    def stop(self) -> None:
        """SIGKILL the server's process group: a crash, not a clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
