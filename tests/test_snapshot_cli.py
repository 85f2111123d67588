"""`attnlog snapshot` writes through FolderSink + the archive and leaves the process as it was."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attnlog.layout import html_path, read_index, tb_attention_tag, tb_pattern_tag
from attnlog.sinks.base import Sink
from attnlog.sinks.folder import FolderSink


def test_write_snapshot_sets_no_environment_and_restores_logging(
    minilm_path, tmp_path, monkeypatch
):
    from transformers.utils import logging as hf_logging

    from attnlog.oneshot import write_snapshot

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        summary = write_snapshot(minilm_path, ["The cat sat on the mat."], tmp_path / "out")
        assert "HF_HUB_OFFLINE" not in os.environ  # local files only, no process-wide switch
        assert hf_logging.get_verbosity() == hf_logging.INFO  # the caller's level, restored
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before)
    out = tmp_path / "out"
    [probe] = [p.name for p in out.iterdir() if (p / "head_view.html").is_file()]
    assert (out / probe / "model.png").is_file() and (out / "scores.json").is_file()
    assert [e["step"] for e in read_index(out)] == [0]
    files = sum(1 for p in out.rglob("*") if p.is_file() and "plugins" not in p.parts)
    assert f"wrote {files} files to {out}" in summary  # every file the folder sink wrote, counted


def image(height=4, width=6):
    return np.full((height, width, 3), 200, dtype=np.uint8)


def test_folder_sink_flattens_the_event_layout(tmp_path):
    from PIL import Image

    sink = FolderSink(tmp_path / "f")
    assert isinstance(sink, Sink)
    sink.log_images({tb_attention_tag("p0 cat", 2): image(), tb_pattern_tag("cls"): image()}, 7)
    sink.log_html({html_path(7, "p0 cat", "head_view"): "<html>ok</html>"}, 7)
    assert sorted(str(p.relative_to(tmp_path / "f")) for p in sink.written) == [
        "p0_cat/head_view.html",
        "p0_cat/layer_2.png",
        "patterns/cls.png",
    ]
    with Image.open(tmp_path / "f/p0_cat/layer_2.png") as png:
        assert png.size == (6, 4) and np.asarray(png)[0, 0].tolist() == [200, 200, 200]


def test_folder_sink_by_step_keeps_every_event(tmp_path):
    from attnlog.patterns import ScoreTable

    sink = FolderSink(tmp_path, by_step=True)
    for step in (0, 5):
        table = ScoreTable(step=step, scores={"cls": np.array([[0.5, np.nan]], dtype=np.float32)})
        sink.log_scores(table, step)
    saved = json.loads((tmp_path / "step_00000005/scores.json").read_text(encoding="utf-8"))
    assert saved["step"] == 5 and saved["scores"]["cls"] == [[0.5, None]]
    assert (tmp_path / "step_00000000/scores.json").is_file()


def test_folder_sink_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        FolderSink(tmp_path / "file" / "out")
