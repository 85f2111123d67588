"""The MLflow spool against a real `mlflow server` on 127.0.0.1: one damaged
entry is set aside alone, the rest is sent to ONE run, and `attnlog sync` ends with a message,
not a traceback. A spool in a shared logdir is not trusted: planted entries send no file that was
not spooled with them, sync sends only to the server the user names, and one sync at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from servers import MlflowServer
from test_sink_mlflow import artifact_files, completes, log_event, runs_of
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

    sync = ["sync", str(logdir), "--tracking-uri", server.uri]
    assert main(sync) == 1  # before: a traceback, the params entry blamed
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
    history = client.get_metric_history(run.info.run_id, "attn.cls.L0")
    assert sorted(m.step for m in history) == [0, 1, 2]  # the damaged entry held HTML only
    experiment = client.get_experiment_by_name("offline")
    assert experiment.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]

    assert main(sync) == 0  # nothing left: a second sync sends nothing
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
    history = MlflowClient(server.uri).get_metric_history(sink.run_id, "attn.cls.L0")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[-1].value == pytest.approx(head_metrics(make_table(2))["attn.cls.L0"])


# ---- a spool in a shared logdir is not trusted ------------------------------------------------

PLANTED_SERVER = "http://planted.invalid:5000"


def entry(run_id=None, **parts) -> dict:
    """A spool entry as the MLflow sink writes it, recorded for `PLANTED_SERVER`."""
    return {"version": 1, "tracking_uri": PLANTED_SERVER, "run_id": run_id,
            "experiment_name": "shared", "step": 0, "metrics": [], "params": {}, "tags": {},
            "artifacts": [], "images": [], "end_run": None} | parts  # fmt: skip


def plant(spool_dir, name: str, files: dict | None = None, **parts) -> None:
    """Write entry `name` by hand, with `files` (relative path -> bytes, or a callable that
    makes the path) in the spool folder."""
    for rel, make in (files or {}).items():
        target = spool_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        make(target) if callable(make) else target.write_bytes(make)
    (spool_dir / f"{name}.json").write_text(json.dumps(entry(**parts)))


@pytest.fixture
def shared_logdir(tmp_path):
    """A logdir whose spool holds one genuine entry and six planted ones, and a secret file
    (a stand-in for ~/.ssh/id_rsa) outside it."""
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- not for the server")
    logdir = tmp_path / "shared"
    spool_dir = default_spool_dir(logdir)
    spool_dir.mkdir(parents=True)
    up = os.path.relpath(secret, spool_dir)  # ../../../../home/.ssh/id_rsa
    plant(spool_dir, "0001", artifacts=[{"path": "id_rsa", "file": up}])
    plant(spool_dir, "0002", artifacts=[{"path": "id_rsa", "file": str(secret)}])
    plant(spool_dir, "0003", files={"0003.files/artifacts/id_rsa": lambda p: p.symlink_to(secret)},
          artifacts=[{"path": "id_rsa", "file": "0003.files/artifacts/id_rsa"}],
          metrics=[["planted.metric", 1.0, 0, 0]])  # fmt: skip
    plant(
        spool_dir,
        "0004",
        files={"0004.files/images/0000.png": os.mkfifo},
        images=[{"key": "k", "step": 0, "timestamp": 0, "file": "0004.files/images/0000.png"}],
    )
    plant(spool_dir, "0005", artifacts=[{"path": "../../escaped.txt", "text": "out of the run"}])
    plant(spool_dir, "0006", files={"0006.files": lambda p: p.symlink_to(secret.parents[1])},
          artifacts=[{"path": "id_rsa", "file": "0006.files/artifacts/id_rsa"}])  # fmt: skip
    (secret.parents[1] / "artifacts").mkdir()
    (secret.parents[1] / "artifacts" / "id_rsa").write_bytes(secret.read_bytes())
    Spool(spool_dir).add(entry(metrics=[["genuine", 0.5, 0, 0]],
                               artifacts=[{"path": "notes/ok.txt", "text": "fine"}]))  # fmt: skip
    return logdir, secret


def test_sync_sends_no_file_that_was_not_spooled_with_its_entry(shared_logdir, tmp_path, capsys):
    logdir, secret = shared_logdir
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("shared", artifact_location=str(tmp_path / "art"))

    assert main(["sync", str(logdir), "--tracking-uri", uri]) == 1  # ends, no hang on the FIFO
    out, err = capsys.readouterr()
    assert f"sending to {uri}, as given; entries recorded for another server: " in out
    assert f"{PLANTED_SERVER} (1)" in out  # said, and not used (the others are refused)
    assert "6 could not be sent" in err and "Traceback" not in err
    for name in ("0001", "0002", "0003", "0004", "0005", "0006"):
        assert f"{name}.json (refused:" in err
    spool_dir = default_spool_dir(logdir)
    assert sorted(p.stem for p in spool_dir.glob("failed/*.json")) == [
        "0001", "0002", "0003", "0004", "0005", "0006"
    ]  # fmt: skip
    assert not list(spool_dir.glob("*.json"))  # the genuine entry was sent

    (run,) = runs_of(uri, "shared")
    assert run.data.metrics == {"genuine": 0.5}  # nothing of a refused entry, not even metrics
    assert artifact_files(MlflowClient(uri), run.info.run_id) == {"notes/ok.txt"}
    sent = [p.read_bytes() for p in tmp_path.joinpath("art").rglob("*") if p.is_file()]
    assert sent == [b"fine"] and secret.read_bytes() not in sent
    assert not (tmp_path / "escaped.txt").exists()


def test_sync_without_a_server_sends_nothing_and_names_the_recorded_ones(
    shared_logdir, monkeypatch, capsys
):
    logdir, _ = shared_logdir
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = sorted(p.name for p in default_spool_dir(logdir).rglob("*"))
    assert main(["sync", str(logdir)]) == 1
    err = capsys.readouterr().err
    assert "attnlog sync: error: no MLflow server given" in err and "--tracking-uri" in err
    assert f"{PLANTED_SERVER} (1)" in err  # the genuine entry; planted ones are refused
    assert sorted(p.name for p in default_spool_dir(logdir).rglob("*")) == before


def this_checkout() -> dict:
    """The environment of a child that imports this checkout's attnlog, not an installed one."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_a_second_sync_at_once_exits_with_a_message_and_starts_no_run(tmp_path, capsys):
    """The first sync is held mid-send by a server that accepts and never answers."""
    logdir = tmp_path / "run"
    spool = Spool(default_spool_dir(logdir))
    for step in range(3):
        spool.add(entry(step=step, metrics=[["m", float(step), 0, step]]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(180)
        first = subprocess.Popen(
            [sys.executable, "-m", "attnlog.cli", "sync", str(logdir),
             "--tracking-uri", f"http://127.0.0.1:{silent.getsockname()[1]}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=this_checkout(),
        )  # fmt: skip
        try:
            connection, _ = silent.accept()  # the first sync is sending now
            assert main(["sync", str(logdir), "--tracking-uri", uri]) == 1
            err = capsys.readouterr().err
            assert f"another sender (pid {first.pid}: an `attnlog sync`" in err
            assert "Traceback" not in err and "Errno" not in err
            connection.close()
        finally:
            first.kill()
            first.wait(timeout=60)
    assert not (tmp_path / "mlflow.db").exists()  # the second started no run
    assert len(spool.entries()) == 3

    assert main(["sync", str(logdir), "--tracking-uri", uri]) == 0  # the lock died with it
    assert "sent 3 spooled entries" in capsys.readouterr().out
    (run,) = runs_of(uri, "shared")  # one run, every entry in it once
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "m")
    assert [m.step for m in history] == [0, 1, 2]


def test_a_planted_lock_link_is_not_written_through(tmp_path, capsys):
    logdir = tmp_path / "run"
    spool = Spool(default_spool_dir(logdir))
    spool.add(entry(metrics=[["m", 1.0, 0, 0]]))
    profile = tmp_path / "home" / ".bashrc"
    profile.parent.mkdir()
    profile.write_text("export PATH=$HOME/bin:$PATH\n")
    (spool.folder / "sync.lock").symlink_to(profile)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["sync", str(logdir), "--tracking-uri", uri]) == 1
    assert "sync.lock cannot be the sync lock" in capsys.readouterr().err
    assert profile.read_text() == "export PATH=$HOME/bin:$PATH\n"  # before: truncated to a pid
    assert len(spool.entries()) == 1
