"""MLflowSink against a real sqlite store and a real `mlflow server` that is killed and restarted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from servers import MlflowServer
from test_sinks_contract import make_html, make_images, make_table

pytest.importorskip("mlflow")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from attnlog.layout import html_path, scores_path  # noqa: E402
from attnlog.sinks.base import head_metrics  # noqa: E402
from attnlog.sinks.mlflow import MLflowSink, mlflow_key  # noqa: E402
from attnlog.sinks.spool import sync  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """(tracking uri, experiment name) of a fresh sqlite store with artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("exp", artifact_location=str(tmp_path / "art"))
    return uri, "exp"


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def log_event(sink: MLflowSink, step: int) -> None:
    sink.log_scores(make_table(step), step)
    sink.log_images({"attention/cat/model": make_images(step)["attention/cat/model"]}, step)
    sink.log_html(make_html(step), step)


def test_everything_reads_back_from_one_run(store, tmp_path):
    uri, experiment = store
    sink = MLflowSink(uri, experiment_name=experiment, spool_dir=tmp_path / "spool")
    sink.log_settings({"every_n_steps": 100, "probes": "x" * 7000})
    tables = {step: make_table(step) for step in (0, 100)}
    for step, table in tables.items():
        sink.log_scores(table, step)
        sink.log_images(make_images(step), step)
        sink.log_html(make_html(step), step)
    sink.close()

    (run,) = runs_of(uri, experiment)
    assert run.info.run_id == sink.run_id and run.info.status == "FINISHED"
    client = MlflowClient(uri)
    expected = head_metrics(tables[0], heads=False)  # layer means: per-head ones are opt-in
    assert "attn.cls.L0" in expected and "attn.cls.L0H1" not in expected
    assert set(expected) == set(run.data.metrics)
    for key in ("attn.sep.L0", "attn.prev.L1", "attn.cross_sentence.L0"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 100]
        for m in history:
            assert m.value == pytest.approx(head_metrics(tables[m.step])[key], rel=1e-6)

    assert run.data.params["attnlog.every_n_steps"] == "100"
    assert run.data.params["attnlog.probes"] == "x" * 6000  # MLflow's value limit
    alerts = sorted(k for k in run.data.tags if k.startswith("attnlog.alert."))
    assert alerts == ["attnlog.alert.0", "attnlog.alert.1"]
    assert run.data.tags["attnlog.alert.1"] == tables[100].alerts[0]

    files = artifact_files(client, run.info.run_id)
    for step in (0, 100):
        assert scores_path(step) in files
        assert set(make_html(step)) <= files
    local = client.download_artifacts(run.info.run_id, scores_path(100), str(tmp_path / "dl"))
    scores = json.loads(Path(local).read_text())
    assert scores["step"] == 100 and scores["scores"]["cross_sentence"][1] == [None, None, None]
    exact = np.asarray(scores["scores"]["sep"], dtype=np.float32)  # every head, exact
    np.testing.assert_array_equal(exact, tables[100].scores["sep"].astype(np.float32))
    html = html_path(0, "cat", "head_view")
    local = client.download_artifacts(run.info.run_id, html, str(tmp_path / "dl2"))
    assert Path(local).read_text() == make_html(0)[html]
    # log_image with key/step: the files MLflow's image slider reads.
    images = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    assert sorted(f.split("+")[0] for f in images) == sorted(
        f"images/{tag.replace('/', '~')}" for tag in make_images(0) for _ in (0, 100)
    )
    assert not list((tmp_path / "spool").glob("*.json"))


def test_head_metrics_are_batched_within_mlflow_limits(store, tmp_path):
    uri, experiment = store
    table = make_table(7, layers=24, heads=16)  # 4 patterns x 384 heads: > 1000 metrics
    assert len(head_metrics(table)) > 1000
    sink = MLflowSink(
        uri, experiment_name=experiment, spool_dir=tmp_path / "spool", head_metrics=True
    )
    sink.log_scores(table, 7)
    sink.close()
    (run,) = runs_of(uri, experiment)
    assert "attn.cls.L23H15" in run.data.metrics
    assert run.data.metrics == pytest.approx(head_metrics(table), rel=1e-6)


@pytest.mark.parametrize("how", ["argument", "env", "active"])
def test_joins_an_existing_run_and_leaves_it_running(how, store, tmp_path, monkeypatch):
    uri, experiment = store
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    spool = tmp_path / "spool"
    if how == "active":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with mlflow.start_run(experiment_id=experiment_id) as active:
            sink = MLflowSink(spool_dir=spool)
        run_id = active.info.run_id
        client.update_run(run_id, status="RUNNING")  # as if the Trainer were still running
    else:
        run_id = client.create_run(experiment_id).info.run_id
        if how == "env":
            monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
            sink = MLflowSink(uri, spool_dir=spool)
        else:
            sink = MLflowSink(uri, run_id=run_id, spool_dir=spool)
    table = make_table(1)
    sink.log_scores(table, 1)
    sink.close()

    (run,) = runs_of(uri, experiment)
    assert run.info.run_id == run_id and run.info.status == "RUNNING"
    assert run.data.metrics == pytest.approx(head_metrics(table, heads=False), rel=1e-6)


class CountingClient(MlflowClient):
    """A real client that also counts its `log_batch` requests."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.batches: list[tuple[int, int, int]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.batches.append((len(metrics), len(params), len(tags)))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


def test_takes_a_client_and_sends_metrics_and_tags_in_one_batch(store, tmp_path):
    uri, experiment = store
    client = CountingClient(uri)
    sink = MLflowSink(client=client, experiment_name=experiment, spool_dir=tmp_path / "spool")
    assert sink.tracking_uri == uri
    table = make_table(3)
    assert table.alerts
    sink.log_scores(table, 3)
    sink.close()
    metrics = len(head_metrics(table, heads=False))
    assert client.batches == [(metrics, 0, len(table.alerts))]  # before: two requests
    (run,) = runs_of(uri, experiment)
    assert run.data.tags["attnlog.alert.0"] == table.alerts[0]


def test_experiments_open_in_the_model_training_view(store, tmp_path, caplog):
    from attnlog.sinks.spool import EXPERIMENT_KIND_TAG, ui_url

    uri, experiment = store
    sink = MLflowSink(uri, experiment_name="new-exp", spool_dir=tmp_path / "spool")
    with caplog.at_level("INFO", logger="attnlog"):
        sink.log_scores(make_table(0), 0)
    sink.close()
    # MLflow 3.17's UI ignores the tag and follows the link's workflowType (checked by hand in
    # Chromium: without it the experiment opens on the GenAI overview).
    new_id = MlflowClient(uri).get_experiment_by_name("new-exp").experiment_id
    link = f"http://127.0.0.1:5000/#/experiments/{new_id}/runs/{sink.run_id}"
    assert ui_url(uri, new_id, sink.run_id) == link + "?workflowType=machine_learning"
    assert any(link + "?workflowType=machine_learning" in r.getMessage() for r in caplog.records)
    assert ui_url("http://mlflow:8080/", "3") == (
        "http://mlflow:8080/#/experiments/3?workflowType=machine_learning"
    )
    joined = MlflowClient(uri).get_experiment_by_name(experiment)  # one attnlog did not create
    run_id = MlflowClient(uri).create_run(joined.experiment_id).info.run_id
    sink = MLflowSink(uri, run_id=run_id, spool_dir=tmp_path / "spool")
    sink.log_scores(make_table(0), 0)
    sink.close()
    for name in ("new-exp", experiment):
        tags = MlflowClient(uri).get_experiment_by_name(name).tags
        assert tags[EXPERIMENT_KIND_TAG[0]] == "custom_model_development"


def test_keys_are_sanitised_in_one_place():
    assert mlflow_key("patterns/cls/layer_0") == "patterns/cls/layer_0"
    assert mlflow_key("attn.句子.L0H1") == "attn.-u53e5-u5b50.L0H1"  # one to one: no "__"
    assert mlflow_key("attention/猫/model") != mlflow_key("attention/狗/model")
    assert mlflow_key("a//b/./c:d") == "a/b/_/c_d"
    assert len(mlflow_key("k" * 400)) == 250
    assert mlflow_key("k" * 399 + "a") != mlflow_key("k" * 399 + "b")  # cut, then hashed


def test_unwritable_spool_fails_at_construction(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="spool"):
        MLflowSink(f"sqlite:///{tmp_path}/mlflow.db", spool_dir=tmp_path / "file" / "spool")


# ---- a real tracking server -------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    yield srv
    srv.stop()


def completes(fn, *args) -> None:
    """Run `fn` in a thread and fail (rather than hang the suite) if it does not return."""
    errors: list[BaseException] = []

    def target():
        try:
            fn(*args)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"{fn.__name__} hung while the server was down"
    if errors:
        raise errors[0]


@pytest.mark.slow
def test_server_killed_and_restarted_loses_nothing(server, tmp_path):
    server.start()
    MlflowClient(server.uri).create_experiment("exp")
    spool = tmp_path / "spool"
    sink = MLflowSink(server.uri, experiment_name="exp", spool_dir=spool, retry_interval_s=60)
    log_event(sink, 0)
    log_event(sink, 1)
    assert not list(spool.glob("*.json"))

    server.stop()
    completes(log_event, sink, 2)
    completes(log_event, sink, 3)
    completes(sink.flush)  # still down: reported, not raised
    spooled = sorted(spool.glob("*.json"))
    assert len(spooled) == 6  # 3 calls per event, one file each
    assert all(json.loads(p.read_text())["run_id"] == sink.run_id for p in spooled)

    server.start()
    sink.flush()
    assert not list(spool.glob("*.json"))
    sink.close()

    (run,) = runs_of(server.uri, "exp")
    assert run.info.run_id == sink.run_id and run.info.status == "FINISHED"
    client = MlflowClient(server.uri)
    for key in ("attn.cls.L0", "attn.sep.L1"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1, 2, 3]  # each step once: nothing sent twice
        assert [m.value for m in history] == pytest.approx(
            [head_metrics(make_table(s))[key] for s in range(4)], rel=1e-6
        )
    files = artifact_files(client, run.info.run_id)
    for step in range(4):
        assert scores_path(step) in files and set(make_html(step)) <= files
    images = [
        f for f in files if f.startswith("images/attention~cat~model+") and f.endswith(".png")
    ]
    assert sorted(int(f.split("+")[2]) for f in images) == [0, 1, 2, 3]


@pytest.mark.slow
def test_sync_sends_a_spool_written_while_the_server_never_answered(server, tmp_path):
    spool = tmp_path / "spool"
    sink = MLflowSink(server.uri, experiment_name="offline", spool_dir=spool)  # nothing listens
    completes(log_event, sink, 0)
    completes(log_event, sink, 5)
    completes(sink.close)
    entries = [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]
    assert len(entries) == 7 and {e["run_id"] for e in entries} == {None}
    assert entries[-1]["end_run"] == "FINISHED"
    with pytest.raises(ConnectionError, match="7 events left"):
        sync(spool, server.uri)

    server.start()
    assert sync(spool, server.uri) == 7
    assert sync(spool, server.uri) == 0
    (run,) = runs_of(server.uri, "offline")
    assert run.info.status == "FINISHED"
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "attn.cls.L0")] == [0, 5]
    files = artifact_files(client, run.info.run_id)
    assert {scores_path(0), scores_path(5)} <= files
    assert len([f for f in files if f.endswith(".png")]) == 2


def test_refused_spool_entry_is_set_aside_and_the_rest_is_sent(store, tmp_path):
    uri, experiment = store
    sink = MLflowSink(uri, experiment_name=experiment, spool_dir=tmp_path / "spool")
    bogus = {"version": 1, "run_id": "0" * 32, "step": 1, "metrics": [["m", 1.0, 0, 1]]}
    bogus |= {"params": {}, "tags": {}, "artifacts": [], "images": [], "end_run": None}
    sink.spool.add(bogus)  # e.g. a run deleted on the server since
    with pytest.raises(RuntimeError, match="moved to"):
        sink.log_scores(make_table(2), 2)  # a refused old entry does not cost this event
    spool = tmp_path / "spool"
    assert (len(list(spool.glob("*.json"))), len(list(spool.glob("failed/*.json")))) == (1, 1)
    sink.close()
    (run,) = runs_of(uri, experiment)
    assert run.data.metrics == pytest.approx(head_metrics(make_table(2), heads=False), rel=1e-6)
    assert not list((tmp_path / "spool").glob("*.json"))


_TRAINING = """
import sys, torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from attnlog import AttentionLogger

name, tokenizer_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
batch = tok(["a b c", "d e f g"], padding=True, return_tensors="pt")
probes = [{"name": name, "text": "The cat sat on the mat."}]
with AttentionLogger(model, tok, probes, sinks=["mlflow"], logdir=name, views=("head", "per_probe"),
                     strict=True) as log:
    for step in range(3):
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
        opt.step(); opt.zero_grad()
        log.log(step)
"""


@pytest.mark.slow
def test_two_trainings_on_one_server_keep_their_runs_apart(server, tmp_path, minilm_path):
    """Two trainings start together on one real server, in an experiment neither has created:
    each gets its own run, with its own metrics and artifacts, and neither fails."""
    import os
    import subprocess
    import sys

    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_EXPERIMENT_NAME": "shared",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    names = ("alpha", "beta")
    procs = [
        subprocess.Popen([sys.executable, "-c", _TRAINING, name, minilm_path], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in names
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    runs = runs_of(server.uri, "shared")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    client = MlflowClient(server.uri)
    owners = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "attn.cls.L0")
        assert sorted(m.step for m in history) == [0, 1, 2]  # each step once, none from the other
        files = artifact_files(client, run.info.run_id)
        (owner,) = [name for name in names if any(f"/{name}/" in f for f in files)]
        assert {html_path(step, owner, "head_view") for step in range(3)} <= files
        owners.append(owner)
    assert sorted(owners) == list(names)
