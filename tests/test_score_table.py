"""The per-run score table the archive sink appends to: the Attention tab's trend and step list
read it instead of every step file, and must answer exactly what the step files say."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_sinks_contract import make_snapshot, make_table

from attnlog.layout import archive_name, plugin_dir, read_index
from attnlog.score_history import TABLE_DIR, logged_steps, read_table
from attnlog.sinks.archive import ArchiveSink
from attnlog.snapshot import load_scores

pytest.importorskip("tensorboard")
from attnlog.tensorboard_plugin.plugin import runs_impl, trend_impl  # noqa: E402

STEPS = (0, 5, 10, 15)


def write_run(folder, steps=STEPS, sink=None):
    sink = sink or ArchiveSink(folder)
    for step in steps:
        sink.log_archive(make_snapshot(step), make_table(step), step)
    return sink


def from_files(folder) -> dict[int, dict[str, np.ndarray]]:
    return {e["step"]: load_scores(plugin_dir(folder) / e["file"]) for e in read_index(folder)}


def every_trend(root, run="."):
    """The trend of every pattern and head, as the tab's /trend serves it."""
    out = {}
    for pattern in make_table().scores:
        for layer in range(2):
            for head in range(3):
                body = trend_impl(root, run, pattern, layer, head)
                out[pattern, layer, head] = (body["steps"], body["values"])
    return out


def test_the_table_holds_what_the_step_files_hold(tmp_path):
    write_run(tmp_path)
    table = read_table(tmp_path)
    assert table.steps.tolist() == list(STEPS) == logged_steps(tmp_path)
    files = from_files(tmp_path)
    for i, step in enumerate(STEPS):
        scores = table.scores(i)
        assert set(scores) == set(files[step])
        for name, matrix in files[step].items():
            np.testing.assert_array_equal(scores[name], matrix)  # NaN where undefined, too
        assert [p["name"] for p in table.layout(i)["probes"]] == ["cat", "pair"]


def test_trend_from_the_table_equals_trend_from_the_step_files(tmp_path):
    write_run(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    shutil.rmtree(plugin_dir(tmp_path / "old") / TABLE_DIR)  # as written before the table
    assert read_table(tmp_path / "old") is None and logged_steps(tmp_path / "old") is None
    new, old = every_trend(tmp_path, "new"), every_trend(tmp_path, "old")
    assert new == old
    assert new["sep", 0, 1] == (
        list(STEPS),
        [float(make_table(s).scores["sep"][0, 1]) for s in STEPS],
    )
    assert new["cross_sentence", 1, 0][1] == [None] * len(STEPS)
    runs = runs_impl(tmp_path)
    assert runs["new"] == runs["old"]
    assert [s["step"] for s in runs["new"]] == list(STEPS)


def test_a_torn_last_record_is_ignored_and_cut_by_the_next_append(tmp_path):
    sink = write_run(tmp_path, STEPS[:2])
    (path,) = (plugin_dir(tmp_path) / TABLE_DIR).glob("*.bin")
    whole = path.stat().st_size
    with open(path, "ab") as fh:  # a crash in the middle of the third record
        fh.write(b"\x07" * 100)
    assert read_table(tmp_path).steps.tolist() == list(STEPS[:2])
    write_run(tmp_path, STEPS[2:], sink)
    assert read_table(tmp_path).steps.tolist() == list(STEPS)
    assert every_trend(tmp_path)["sep", 0, 1][1] == [
        float(make_table(s).scores["sep"][0, 1]) for s in STEPS
    ]
    record = (path.stat().st_size - whole) // 2
    with open(path, "r+b") as fh:  # a record zero-filled by a crash (size written, data not)
        fh.seek(whole)  # step 10
        fh.write(bytes(record))
    assert read_table(tmp_path).steps.tolist() == [0, 5, 15]


def test_a_step_logged_again_is_read_as_last_written(tmp_path):
    write_run(tmp_path, (0, 10))
    resumed = ArchiveSink(tmp_path)  # a resumed run logs step 10 again, with other scores
    resumed.log_archive(make_snapshot(99), make_table(99), 10)
    table = read_table(tmp_path)
    assert table.steps.tolist() == [0, 10]
    np.testing.assert_array_equal(table.scores(1)["cls"], make_table(99).scores["cls"])
    assert every_trend(tmp_path)["cls", 1, 2][1] == [
        float(make_table(s).scores["cls"][1, 2]) for s in (0, 99)
    ]


def test_a_new_layout_gets_its_own_table_and_both_are_read(tmp_path):
    sink = write_run(tmp_path, (0, 10))
    wider = make_table(20, heads=4)  # another model resumed into the same run
    sink.log_archive(make_snapshot(20, heads=4), wider, 20)
    sink.log_archive(make_snapshot(7), make_table(7), 10)  # and step 10 again, old layout
    assert len(list((plugin_dir(tmp_path) / TABLE_DIR).glob("*.bin"))) == 2
    body = trend_impl(tmp_path, ".", "sep", 0, 3)  # head 3 exists in the new layout only
    assert body["steps"] == [0, 10, 20]
    assert body["values"] == [None, None, float(wider.scores["sep"][0, 3])]
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["values"][1] == float(
        make_table(7).scores["sep"][0, 1]
    )
    runs = runs_impl(tmp_path)["."]
    assert [s["layout"] for s in runs] == [0, 0, 1]  # each layout in full at its first step
    assert [p["shapes"]["attention"][1] for p in runs[2]["probes"]] == [4, 4]
    assert "probes" not in runs[1]


def test_a_run_begun_before_the_table_is_read_from_its_step_files(tmp_path):
    write_run(tmp_path, STEPS[:2])
    shutil.rmtree(plugin_dir(tmp_path) / TABLE_DIR)  # steps 0 and 5 by an older attnlog
    write_run(tmp_path, STEPS[2:])  # the run goes on with this one
    (path,) = (plugin_dir(tmp_path) / TABLE_DIR).glob("*.bin")
    assert json.loads(path.read_bytes().split(b"\n")[0].split(b" ", 2)[2])["partial"] is True
    assert read_table(tmp_path) is None  # it does not cover steps 0 and 5
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == list(STEPS)
    assert [s["step"] for s in runs_impl(tmp_path)["."]] == list(STEPS)


def test_a_damaged_table_falls_back_to_the_step_files(tmp_path):
    write_run(tmp_path)
    (path,) = (plugin_dir(tmp_path) / TABLE_DIR).glob("*.bin")
    path.write_bytes(b"not a table\n" + path.read_bytes())
    with pytest.raises(ValueError, match="not an attnlog score table"):
        read_table(tmp_path)
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == list(STEPS)


def test_a_step_file_cut_short_or_gone_is_left_out(tmp_path):
    write_run(tmp_path)
    (plugin_dir(tmp_path) / archive_name(5)).unlink()
    last = plugin_dir(tmp_path) / archive_name(15)
    last.write_bytes(last.read_bytes()[:200])
    assert [s["step"] for s in runs_impl(tmp_path)["."]] == [0, 10]
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == [0, 10]


def test_steps_logged_while_the_tab_is_open_appear(tmp_path):
    sink = write_run(tmp_path, STEPS[:2])
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == list(STEPS[:2])
    write_run(tmp_path, STEPS[2:], sink)  # training goes on; the plugin's caches must notice
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == list(STEPS)
    assert [s["step"] for s in runs_impl(tmp_path)["."]] == list(STEPS)


def test_a_table_the_writer_cannot_append_to_is_set_aside(tmp_path, caplog):
    sink = write_run(tmp_path, STEPS[:2])
    (path,) = (plugin_dir(tmp_path) / TABLE_DIR).glob("*.bin")
    path.write_bytes(b"overwritten by something else")
    with caplog.at_level("WARNING", logger="attnlog"):
        write_run(tmp_path, STEPS[2:], sink)  # the archive goes on
    assert "score table" in caplog.text and "set aside" in caplog.text
    assert [e["step"] for e in read_index(tmp_path)] == list(STEPS)
    assert read_table(tmp_path) is None  # partial: readers use the step files
    assert trend_impl(tmp_path, ".", "sep", 0, 1)["steps"] == list(STEPS)
