"""The browse command attnlog prints works: a real `tensorboard` server serves every logged step."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from attnlog.cli import BROWSE_HINT
from attnlog.sinks.base import tb_attention_tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_printed_tensorboard_command_shows_every_logged_step(tmp_path):
    pytest.importorskip("tensorboard")
    from attnlog.sinks.tensorboard import TensorBoardSink

    steps = list(range(0, 24 * 5, 5))  # 24 events: more than TensorBoard's default of 10
    sink = TensorBoardSink(tmp_path / "run1")
    tag = tb_attention_tag("cat", 0)
    for step in steps:
        sink.log_images({tag: np.full((8, 8, 3), step, dtype=np.uint8)}, step)
    sink.close()

    flag = BROWSE_HINT.split("--samples_per_plugin", 1)[1].split()[0]  # what users are told
    port = _free_port()
    exe = shutil.which("tensorboard") or sys.executable
    cmd = [exe] if exe != sys.executable else [exe, "-m", "tensorboard.main"]
    server = subprocess.Popen(
        [*cmd, "--logdir", str(tmp_path), "--samples_per_plugin", flag,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/images"
        deadline = time.monotonic() + 60
        while tag not in _get(f"{base}/tags", deadline).get("run1", {}):
            assert time.monotonic() < deadline, "TensorBoard never listed the image tag"
            time.sleep(0.5)
        query = urllib.parse.urlencode({"run": "run1", "tag": tag, "sample": 0})
        served = _get(f"{base}/images?{query}", deadline)
        assert [item["step"] for item in served] == steps
    finally:
        server.terminate()
        server.wait(timeout=20)
