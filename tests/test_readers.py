"""Reading a run's archive back: one public `attnlog.load`, and readers that stay safe on what a
shared or damaged run folder can hold."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil

import numpy as np
import pytest
from test_sinks_contract import make_snapshot, make_table

import attnlog
from attnlog.cli import main
from attnlog.files import NotARegularFile
from attnlog.layout import INDEX, archive_name, plugin_dir, read_index
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


# ---- readers never hang on a FIFO ----------------------------------------------------------------


def fifo_run(tmp_path, name="run"):
    """Steps 0 and 10 archived, then step 10's file replaced by a FIFO that no one writes to."""
    logdir = tmp_path / name
    archive(logdir)
    last = plugin_dir(logdir) / archive_name(10)
    last.unlink()
    os.mkfifo(last)
    return logdir


@pytest.mark.timeout(120)  # a reader that opens the FIFO blocks for good: fail, do not hang
def test_report_export_and_compare_skip_a_fifo_step(tmp_path, capsys):
    logdir = fifo_run(tmp_path)
    assert main(["report", str(logdir)]) == 0
    assert "step 0, probes: cat, pair" in capsys.readouterr().out  # the last readable step
    assert main(["report", str(logdir), "--step", "10"]) == 1
    assert "missing or damaged" in capsys.readouterr().err
    out = tmp_path / "fig.svg"
    assert main(["export", str(logdir), "--pattern", "prev", "--out", str(out)]) == 0
    assert "prev · step 0" in out.read_text(encoding="utf-8")
    assert main(["compare", str(logdir), str(logdir)]) == 0
    assert "(step 0)" in capsys.readouterr().out
    with pytest.raises(NotARegularFile, match="is a FIFO"):
        attnlog.load(plugin_dir(logdir) / archive_name(10))


@pytest.mark.timeout(120)
def test_a_fifo_index_is_an_error_not_a_hang(tmp_path, capsys):
    logdir = tmp_path / "run"
    plugin_dir(logdir).mkdir(parents=True)
    os.mkfifo(plugin_dir(logdir) / INDEX)
    assert main(["report", str(logdir)]) == 1
    assert "is a FIFO; attnlog reads only regular files" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_the_attention_tab_scores_and_trend_skip_a_fifo_step(tmp_path):
    pytest.importorskip("tensorboard")
    from attnlog.tensorboard_plugin.plugin import RequestError, scores_impl, trend_impl

    fifo_run(tmp_path)
    trend = trend_impl(tmp_path, "run", "prev", 0, 1)
    assert trend["steps"] == [0]
    assert trend["values"] == [pytest.approx(float(make_table(0).scores["prev"][0, 1]))]
    assert scores_impl(tmp_path, "run", 0)["step"] == 0
    with pytest.raises(RequestError, match="missing or damaged"):
        scores_impl(tmp_path, "run", 10)


# ---- crafted archives ------------------------------------------------------------------------


def craft(path, *, tokens=None, scores=None) -> None:
    """Rewrite an archived step: probe 0's token list cut to `tokens`, or pattern `prev`'s
    scores replaced by `scores` (what a hand-made archive can hold)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    if tokens is not None:
        meta["probes"][0]["tokens"] = meta["probes"][0]["tokens"][:tokens]
    if scores is not None:
        arrays["scores/prev"] = scores
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize(
    "damage", [{"tokens": 2}, {"scores": np.arange(3, dtype=np.float32)}], ids=["cut", "1-D"]
)
def test_a_crafted_step_is_refused_with_what_is_wrong(tmp_path, capsys, damage):
    logdir = tmp_path / "run"
    archive(logdir)
    step_10 = plugin_dir(logdir) / archive_name(10)
    craft(step_10, **damage)
    with pytest.raises(ValueError, match="is damaged: "):
        attnlog.load(step_10)

    out = tmp_path / "fig.svg"
    args = ["export", str(logdir), "--layer", "0", "--head", "0", "--out", str(out)]
    assert main([*args, "--step", "10"]) == 1  # before: an IndexError traceback
    err = capsys.readouterr().err
    assert "step_00000010.npz is damaged: " in err and "Traceback" not in err
    assert main(args) == 0  # the last readable step instead
    assert "step 0" in out.read_text(encoding="utf-8")
    assert main(["compare", str(logdir), str(logdir)]) == 0
    assert "(step 0)" in capsys.readouterr().out

    craft(plugin_dir(logdir) / archive_name(0), **damage)  # no readable step left
    assert main(["compare", str(logdir), str(logdir)]) == 1
    err = capsys.readouterr().err
    assert "no readable step" in err and "Traceback" not in err


def test_pooled_spans_outside_the_tokens_are_refused(tmp_path, capsys):
    """A pooled probe's blocks index its tokens: a span past them was an IndexError in export."""
    snapshot = make_snapshot(0)
    probe = snapshot.probes[0]  # 6 tokens, pooled into 3 blocks
    probe.attention, probe.labels = probe.attention[:, :, :3, :3], ["a", "b", "c"]
    for step, spans in ((0, [[0, 3], [3, 5], [5, 6]]), (1, [[0, 3], [5, 2], [100, 200]])):
        probe.spans = np.array(spans)
        snapshot.step = step
        ArchiveSink(tmp_path).log_archive(snapshot, make_table(step), step)
    out = tmp_path / "fig.svg"
    args = ["export", str(tmp_path), "--layer", "0", "--head", "0", "--out", str(out)]
    assert main([*args, "--step", "0"]) == 0
    assert main([*args, "--step", "1"]) == 1
    assert "spans are not 3 ordered token ranges inside its 6 tokens" in capsys.readouterr().err
