"""The browse command attnlog prints works: a real `tensorboard` server serves every logged step."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from servers import free_port, get_json, start_tensorboard

from attnlog.cli import BROWSE_HINT
from attnlog.layout import tb_attention_tag


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
    port = free_port()
    server = start_tensorboard(tmp_path, port, "--samples_per_plugin", flag)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/images"
        deadline = time.monotonic() + 60
        while tag not in get_json(f"{base}/tags", deadline).get("run1", {}):
            assert time.monotonic() < deadline, "TensorBoard never listed the image tag"
            time.sleep(0.5)
        query = urllib.parse.urlencode({"run": "run1", "tag": tag, "sample": 0})
        served = get_json(f"{base}/images?{query}", deadline)
        assert [item["step"] for item in served] == steps
    finally:
        server.terminate()
        server.wait(timeout=20)
