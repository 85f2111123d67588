"""Helpers for tests that start real servers on 127.0.0.1 (TensorBoard, torch.distributed).

Import with `from servers import ...` (pytest puts tests/ on sys.path; tests/ is no package).
"""

from __future__ import annotations

import json
import shutil
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
