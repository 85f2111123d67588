"""ArchiveSink: one `.npz` per step plus `index.jsonl`, read back with `attnlog.load`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_sinks_contract import HEADS, LAYERS, make_snapshot, make_table

import attnlog.snapshot as snapshot_module
from attnlog import load
from attnlog.layout import plugin_dir, read_index
from attnlog.sinks.archive import ArchiveSink
from attnlog.snapshot import ProbeAttention, Snapshot


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


def _with_vectors(step: int = 100, d: int = 16) -> Snapshot:
    """`make_snapshot` plus query/key vectors `[L, H, n, d]` of a different size in every head."""
    snapshot = make_snapshot(step)
    rng = np.random.default_rng(step)
    for probe in snapshot.probes:
        shape = (*probe.attention.shape[:2], len(probe), d)
        size = 10.0 ** rng.uniform(-2, 2, size=(*shape[:2], 1, 1))
        probe.queries = (rng.normal(size=shape) * size).astype(np.float32)
        probe.keys = (rng.normal(size=shape) * size).astype(np.float32)
    snapshot.probes[0].keys[0, 1] = 0.0  # an all-zero head
    return snapshot


def _assert_vectors_close(
    loaded: ProbeAttention, original: ProbeAttention, names: tuple[str, ...] = ("queries", "keys")
) -> None:
    """Within half an int8 step (1/254 of the head's largest value) of the float16 values that
    `save` starts from, plus the float16 rounding of the value read back."""
    for name in names:
        value = getattr(loaded, name)
        expected = getattr(original, name).astype(np.float16).astype(np.float32)
        assert value.dtype == np.float16 and value.shape == expected.shape
        peak = np.abs(expected).max(axis=(2, 3), keepdims=True)
        error = np.abs(value.astype(np.float32) - expected)
        assert (error <= peak / 254 + np.abs(expected) * 2**-10).all(), name


def test_queries_and_keys_are_stored_as_int8_and_read_back_as_float16(tmp_path):
    original = _with_vectors()
    path = original.save(tmp_path / "step.npz")
    with np.load(path) as data:
        assert data["p0/queries_q8"].dtype == np.int8 and "p0/queries" not in data
        assert data["p1/keys_scale"].dtype == np.float32
        assert data["p1/keys_scale"].shape == (LAYERS, HEADS)
    loaded = load(path)
    for back, probe in zip(loaded.probes, original.probes):
        _assert_vectors_close(back, probe)
        np.testing.assert_array_equal(back.attention, probe.attention.astype(np.float16))
    assert not loaded.probes[0].keys[0, 1].any()  # the all-zero head stays zero


def test_version_2_archives_with_float16_vectors_still_load_and_are_larger(tmp_path, monkeypatch):
    original = _with_vectors(d=64)  # vectors the size of a real model's, as in a real archive
    new = original.save(tmp_path / "v3.npz")
    with monkeypatch.context() as old_writer:  # this attnlog's save as version 2 wrote it
        old_writer.setattr(snapshot_module, "FORMAT_VERSION", 2)
        old_writer.setattr(snapshot_module, "_quantise_vectors", lambda vectors: None)
        old = original.save(tmp_path / "v2.npz")
    with np.load(old) as data:
        assert data["p0/queries"].dtype == np.float16 and "p0/queries_q8" not in data
        assert json.loads(bytes(data["meta"]).decode())["version"] == 2
    loaded = load(old)
    for back, probe in zip(loaded.probes, original.probes):
        np.testing.assert_array_equal(back.queries, probe.queries.astype(np.float16))
        np.testing.assert_array_equal(back.keys, probe.keys.astype(np.float16))
    assert new.stat().st_size < 0.75 * old.stat().st_size


def test_non_finite_vectors_are_kept_as_float16(tmp_path):
    original = _with_vectors()
    original.probes[1].queries[1, 2, 3, 4] = np.nan
    original.probes[1].queries[0, 0, 0, 0] = np.inf
    path = original.save(tmp_path / "step.npz")
    with np.load(path) as data:
        assert "p1/queries" in data and "p1/keys_q8" in data and "p0/queries_q8" in data
    loaded = load(path).probes[1]
    assert np.isnan(loaded.queries[1, 2, 3, 4]) and np.isposinf(loaded.queries[0, 0, 0, 0])
    np.testing.assert_array_equal(loaded.queries, original.probes[1].queries.astype(np.float16))
    _assert_vectors_close(loaded, original.probes[1], names=("keys",))


def test_a_damaged_scale_is_refused(tmp_path):
    path = _with_vectors().save(tmp_path / "step.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["p0/queries_scale"] = arrays["p0/queries_scale"][:1]
    np.savez_compressed(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(ValueError, match="damaged"):
        load(tmp_path / "damaged.npz")
