"""The MLflow spool against a real `mlflow server` on 127.0.0.1: one damaged
entry is set aside alone, the rest is sent to ONE run, and `attnlog sync` ends with a message,
not a traceback."""

from __future__ import annotations

import json

import pytest
from servers import MlflowServer
from test_sink_mlflow import completes, log_event, runs_of
from test_sinks_contract import make_table

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from attnlog.cli import main  # noqa: E402
from attnlog.layout import default_spool_dir  # noqa: E402
from attnlog.sinks.base import head_metrics  # noqa: E402
from attnlog.sinks.mlflow import MLflowSink  # noqa: E402
from attnlog.sinks.spool import EXPERIMENT_KIND_TAG, CorruptEntry, Spool  # noqa: E402


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    yield srv
    srv.stop()


def spool_while_down(server: MlflowServer, logdir, steps=(0, 1, 2)) -> list:
    """A whole run logged while nothing listens: every entry waits without a run."""
    sink = MLflowSink(server.uri, experiment_name="offline", logdir=logdir)
    sink.log_settings({"every_n_steps": "1"})
    for step in steps:
        completes(log_event, sink, step)
    completes(sink.close)
    entries = Spool(default_spool_dir(logdir)).entries()
    assert {json.loads(p.read_text())["run_id"] for p in entries} == {None}
    return entries


def test_a_damaged_entry_cannot_be_loaded_but_the_others_can(tmp_path):
    spool = Spool(tmp_path)
    good = spool.add({"run_id": None, "metrics": [], "params": {"a": "1"}, "tags": {},
                      "artifacts": [], "images": []})  # fmt: skip
    for name, raw in [("a", b"\xff\xfe not utf-8"), ("b", b'{"metrics": 5}'), ("c", b"[1]")]:
        (tmp_path / f"{name}.json").write_bytes(raw)
        with pytest.raises(CorruptEntry):
            spool.load(tmp_path / f"{name}.json")
    moved = spool.assign_run("r" * 32)  # before: the first bad file stopped it, run split
    assert sorted(p.name for p in moved) == ["a.json", "b.json", "c.json"]
    assert spool.load(good)["run_id"] == "r" * 32
    assert spool.entries() == [good]


@pytest.mark.slow
def test_sync_sets_aside_only_the_damaged_entry_and_keeps_one_run(server, tmp_path, capsys):
    logdir = tmp_path / "run"
    entries = spool_while_down(server, logdir)
    damaged = entries[3]  # in the middle: params and the first events come before it
    damaged.write_bytes(b'{"version": 1, "metrics": [["attn.cls.L0H0", 0.5, 0, ')  # torn
    server.start()

    assert main(["sync", str(logdir)]) == 1  # before: a traceback, the params entry blamed
    err = capsys.readouterr().err
    # other libraries' log lines may come first (MLflow's own INFO lines, when configured)
    assert any(line.startswith("attnlog sync: error:") for line in err.splitlines()), err
    assert "Traceback" not in err
    assert damaged.name in err and "damaged" in err
    spool = default_spool_dir(logdir)
    assert not list(spool.glob("*.json"))
    assert [p.name for p in spool.glob("failed/*.json")] == [damaged.name]

    (run,) = runs_of(server.uri, "offline")  # before: the rest landed in a second run
    assert run.info.status == "FINISHED"
    assert run.data.params["attnlog.every_n_steps"] == "1"
    client = MlflowClient(server.uri)
    history = client.get_metric_history(run.info.run_id, "attn.cls.L0H0")
    assert sorted(m.step for m in history) == [0, 1, 2]  # the damaged entry held HTML only
    experiment = client.get_experiment_by_name("offline")
    assert experiment.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]

    assert main(["sync", str(logdir)]) == 0  # nothing left: a second sync sends nothing
    assert "sent 0" in capsys.readouterr().out


@pytest.mark.slow
def test_the_sink_sets_aside_a_damaged_entry_and_sends_the_rest(server, tmp_path, caplog):
    logdir = tmp_path / "run"
    sink = MLflowSink(server.uri, experiment_name="exp", logdir=logdir, retry_interval_s=0)
    completes(log_event, sink, 0)  # server down: spooled without a run
    completes(log_event, sink, 1)
    spool = default_spool_dir(logdir)
    entries = sorted(spool.glob("*.json"))
    entries[1].write_bytes(b"\x00\x01 not an entry")
    server.start()
    with caplog.at_level("WARNING", logger="attnlog"):
        sink.log_scores(make_table(2), 2)  # drains the spool first
    sink.close()
    assert any(entries[1].name in r.getMessage() for r in caplog.records)
    assert [p.name for p in spool.glob("failed/*.json")] == [entries[1].name]
    (run,) = runs_of(server.uri, "exp")
    assert run.info.run_id == sink.run_id and run.info.status == "FINISHED"
    history = MlflowClient(server.uri).get_metric_history(sink.run_id, "attn.cls.L0H0")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[-1].value == pytest.approx(head_metrics(make_table(2))["attn.cls.L0H0"])
