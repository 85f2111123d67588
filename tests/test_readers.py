"""Reading a run's archive back: one public `attnlog.load`, and readers that stay safe on what a
shared or damaged run folder can hold."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
from test_sinks_contract import make_snapshot, make_table

import attnlog
from attnlog.layout import plugin_dir, read_index
from attnlog.sinks.archive import ArchiveSink


def archive(logdir, steps=(0, 10)) -> None:
    sink = ArchiveSink(logdir)
    for step in steps:
        sink.log_archive(make_snapshot(step), make_table(step), step)
    sink.close()


# ---- one public load --------------------------------------------------------------------------


def test_one_public_load_returns_a_snapshot_for_a_file_and_for_a_run(tmp_path):
    archive(tmp_path)
    for entry in read_index(tmp_path):  # the documented loop over a run's steps
        snapshot = attnlog.load(plugin_dir(tmp_path) / entry["file"])
        assert isinstance(snapshot, attnlog.Snapshot) and snapshot.step == entry["step"]
        np.testing.assert_array_equal(
            snapshot.scores["prev"], make_table(entry["step"]).scores["prev"]
        )
    assert attnlog.load(tmp_path).step == 10  # a run: its last step
    assert attnlog.load(tmp_path, step=0).probes[0].tokens == make_snapshot(0).probes[0].tokens


def test_no_other_module_offers_a_public_load():
    offered = []
    for info in pkgutil.iter_modules(attnlog.__path__, "attnlog."):
        if info.name in ("attnlog.callbacks", "attnlog.tensorboard_plugin"):
            continue  # heavy (transformers, tensorboard); neither defines a load
        module = importlib.import_module(info.name)
        found = module.__dict__.get("load")
        if callable(found):
            offered.append(f"{found.__module__}.{found.__qualname__}")
    assert set(offered) == {"attnlog.report.load"}  # imported elsewhere, defined once
    assert attnlog.load is importlib.import_module("attnlog.report").load
