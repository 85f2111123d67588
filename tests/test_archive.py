"""ArchiveSink: one `.npz` per step plus `index.jsonl`, read back with `attnlog.load`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_sinks_contract import make_snapshot, make_table

from attnlog import load
from attnlog.layout import plugin_dir, read_index
from attnlog.sinks.archive import ArchiveSink


def test_each_step_is_archived_and_indexed(tmp_path):
    sink = ArchiveSink(tmp_path)
    for step in (0, 100, 200):
        sink.log_archive(make_snapshot(step), make_table(step), step)
    sink.close()

    index = read_index(tmp_path)
    assert [e["step"] for e in index] == [0, 100, 200]
    shapes = index[1].pop("probe_shapes")
    assert index[1] == {
        "step": 100,
        "file": "step_00000100.npz",
        "probes": ["cat", "pair"],
        "model_type": "bert",
        "patterns": ["cls", "cross_sentence", "prev", "sep"],
    }
    assert shapes == [
        {"name": "cat", "pooled": False, "shapes": {"attention": [2, 3, 6, 6]}},
        {"name": "pair", "pooled": False, "shapes": {"attention": [2, 3, 7, 7]}},
    ]
    snapshot = load(plugin_dir(tmp_path) / index[1]["file"])
    scores = snapshot.scores
    original, table = make_snapshot(100), make_table(100)
    assert [p.name for p in snapshot.probes] == ["cat", "pair"]
    assert snapshot.probes[1].tokens == original.probes[1].tokens
    assert snapshot.probes[1].attention.dtype == np.float16
    np.testing.assert_allclose(
        snapshot.probes[1].attention, original.probes[1].attention, atol=1e-3
    )
    np.testing.assert_array_equal(snapshot.probes[1].segment, original.probes[1].segment)
    assert set(scores) == set(table.scores)
    # NaN (undefined) scores survive the round trip.
    np.testing.assert_array_equal(scores["cross_sentence"], table.scores["cross_sentence"])


def test_resumed_step_replaces_its_index_line(tmp_path):
    sink = ArchiveSink(tmp_path)
    sink.log_archive(make_snapshot(0), make_table(0), 0)
    sink.log_archive(make_snapshot(100), make_table(100), 100)
    sink.close()

    resumed = ArchiveSink(tmp_path)  # a new process resuming from the step-100 checkpoint
    snapshot = make_snapshot(100)
    snapshot.model_type = "bert-resumed"
    resumed.log_archive(snapshot, make_table(100), 100)
    resumed.log_archive(make_snapshot(200), make_table(200), 200)

    lines = (plugin_dir(tmp_path) / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 100, 200]
    assert [e["model_type"] for e in read_index(tmp_path)] == ["bert", "bert-resumed", "bert"]
    assert load(plugin_dir(tmp_path) / "step_00000100.npz").model_type == "bert-resumed"
    assert sorted(p.name for p in plugin_dir(tmp_path).iterdir()) == [
        "index.jsonl",
        "index.lock",
        "scores",
        "step_00000000.npz",
        "step_00000100.npz",
        "step_00000200.npz",
    ]


def test_reader_dedups_by_step_and_skips_a_cut_line(tmp_path):
    folder = plugin_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "index.jsonl").write_text(
        '{"step": 5, "file": "a"}\n{"step": 1, "file": "b"}\n{"step": 5, "file": "c"}\n{"step": 9, "fi'
    )
    assert read_index(tmp_path) == [{"step": 1, "file": "b"}, {"step": 5, "file": "c"}]
    assert read_index(tmp_path / "missing") == []


def test_disk_error_while_logging_raises(tmp_path):
    sink = ArchiveSink(tmp_path / "run")
    (tmp_path / "run").write_text("the log folder became a file")
    with pytest.raises(OSError):
        sink.log_archive(make_snapshot(0), make_table(0), 0)


def test_attnlog_load_returns_a_snapshot_with_its_scores(tmp_path):
    import attnlog

    sink = ArchiveSink(tmp_path)
    for step in (0, 100):
        sink.log_archive(make_snapshot(step), make_table(step), step)
    last = attnlog.load(tmp_path)  # a logdir: its last step
    assert last.step == 100 and [p.name for p in last.probes] == ["cat", "pair"]
    np.testing.assert_array_equal(last.scores["cls"], make_table(100).scores["cls"])
    first = attnlog.load(plugin_dir(tmp_path) / "step_00000000.npz")  # one step's file
    assert first.step == 0 and set(first.scores) == set(make_table(0).scores)
    assert attnlog.load(tmp_path, step=0).step == 0
    with pytest.raises(ValueError, match="step 5"):
        attnlog.load(tmp_path, step=5)


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="no O_NOFOLLOW here")
def test_a_planted_index_link_is_refused_and_its_target_left_alone(tmp_path):
    """A shared logdir where someone linked index.jsonl to a user's file: the sink refuses to
    append through the link (the writer contains and reports the error), the file is untouched."""
    target = tmp_path / "bashrc"
    target.write_text("export PATH=/usr/bin\n")
    folder = plugin_dir(tmp_path / "run")
    folder.mkdir(parents=True)
    (folder / "index.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        ArchiveSink(tmp_path / "run").log_archive(make_snapshot(0), make_table(0), 0)
    assert target.read_text() == "export PATH=/usr/bin\n"
