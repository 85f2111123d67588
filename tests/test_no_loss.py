"""No event dropped: the outbox overflows to disk, writers that die are restarted for as long as
they make progress, an event that kills the writer is set aside, and every event not written is
counted and named. Real writer processes (killed with SIGKILL), real sinks read back."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
from test_writer import gate  # noqa: F401  (a fixture: the `gate` sink registered by name)

from attnlog.layout import read_index
from attnlog.sinks.memory import MemorySink
from attnlog.writer.frames import receive

PROBES = ["The cat sat on the mat."]


class KillerSink(MemorySink):
    """Kills its own (writer) process with SIGKILL in `log_scores` of the steps listed in
    `<folder>/kill-<step>`, each file holding how many more times to kill."""

    name = "killer"

    def __init__(self, logdir=None, folder: str = ".") -> None:
        super().__init__()
        self.folder = Path(folder)

    def log_scores(self, table, step) -> None:
        order = self.folder / f"kill-{step}"
        if order.exists():
            left = int(order.read_text())
            if left > 0:
                order.write_text(str(left - 1))
                os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def killer(monkeypatch, tmp_path):
    """The `killer` sink registered by name (the writer imports it from this module)."""
    from attnlog.sinks.base import SINKS

    monkeypatch.setitem(SINKS, "killer", KillerSink)
    folder = tmp_path / "killer"
    folder.mkdir()
    return folder


def make_logger(minilm, logdir, sinks, **options):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    options.setdefault("views", ())
    options.setdefault("writer", "process")  # `auto` picks the thread on a CPU this small
    return AttentionLogger(model, tokenizer, PROBES, sinks=sinks, logdir=logdir, **options)


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_events_logged_before_the_writer_process_is_ready_all_arrive(minilm, tmp_path):
    """The writer process takes seconds to start: what is logged meanwhile waits, on disk."""
    logdir = tmp_path / "run"
    logger = make_logger(minilm, logdir, [], queue_size=1)
    for step in range(6):
        assert logger.log(step)
    assert logger.close(timeout=120) is True
    assert [e["step"] for e in read_index(logdir)] == [0, 1, 2, 3, 4, 5]
    assert logger.stats["lost"] == 0 and logger.stats["dropped"] == 0


def test_past_the_disk_bound_events_are_dropped_counted_and_named(minilm, tmp_path, gate):  # noqa: F811
    from test_writer import wait_for

    logdir = tmp_path / "run"
    logger = make_logger(minilm, logdir, ["gate"], queue_size=1, spill_mb=0.001,  # none fits
                         sink_options={"gate": {"folder": str(gate)}})  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger.log(0)
        wait_for(lambda: (gate / "entered-0").exists(), "the writer to hold step 0")
        steps = 1
        while not logger.stats["dropped"] and steps < 100:  # until the pipe and memory are full
            logger.log(steps)
            steps += 1
        (gate / "open").touch()
        flushed = logger.flush(timeout=120)
        logger.close(timeout=120)
    written = [e["step"] for e in read_index(logdir)]
    dropped = sorted(set(range(steps)) - set(written))
    assert dropped and written == sorted(written)
    assert flushed is False  # flush says events were lost
    assert logger.stats["dropped"] == logger.stats["lost"] == len(dropped)
    said = "\n".join(messages(record))
    assert f"dropped the event of step {dropped[0]}: the outbox on disk is full" in said
    assert f"the events of steps {dropped} were not written" in said


def test_restarts_are_counted_in_a_row_so_a_writer_dying_now_and_then_loses_nothing(
    minilm, tmp_path, killer
):
    """The writer dies at four different steps (more than MAX_RESTARTS over the run): each time
    it is restarted, the event is resent, and every step arrives."""
    from attnlog.writer.process import MAX_RESTARTS

    kills = [1, 3, 5, 7]
    assert len(kills) > MAX_RESTARTS
    for step in kills:
        (killer / f"kill-{step}").write_text("1")
    logdir = tmp_path / "run"
    logger = make_logger(
        minilm, logdir, ["killer"], sink_options={"killer": {"folder": str(killer)}}
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(9):
            assert logger.log(step)
            assert logger.flush(timeout=120) is True  # nothing lost
        assert logger.close(timeout=120) is True
    assert [e["step"] for e in read_index(logdir)] == list(range(9))
    assert logger.stats["writer_restarts"] == len(kills) and logger.stats["lost"] == 0


def test_an_event_that_kills_the_writer_twice_is_set_aside_and_the_run_goes_on(
    minilm, tmp_path, killer
):
    (killer / "kill-1").write_text("99")  # step 1 kills every writer that tries it
    logdir = tmp_path / "run"
    logger = make_logger(
        minilm, logdir, ["killer"], sink_options={"killer": {"folder": str(killer)}}
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(4):
            assert logger.log(step)
        assert logger.flush(timeout=120) is False  # says an event was lost
        assert logger.close(timeout=120) is True
    assert [e["step"] for e in read_index(logdir)] == [0, 2, 3]
    assert logger.stats["lost"] == 1 and logger.stats["set_aside"] == 1
    [kept] = (logdir / "attnlog-outbox" / "set-aside").iterdir()
    said = "\n".join(messages(record))
    assert f"while writing the event of step 1; that event is set aside in {kept}" in said
    assert "the events of steps [1] were not written" in said
    with open(kept, "rb") as stream:  # the event itself, for whoever investigates
        event = receive(stream)
    assert event.step == 1 and event.snapshot.probes[0].tokens


def test_close_that_gives_up_counts_every_event_it_leaves_as_lost(minilm, tmp_path, gate):  # noqa: F811
    logger = make_logger(
        minilm, tmp_path / "run", ["gate"], sink_options={"gate": {"folder": str(gate)}}
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        logger.log(0)
        logger.log(1)  # waits behind step 0, which hangs in the sink
        from test_writer import wait_for

        wait_for(lambda: (gate / "entered-0").exists(), "the writer to hang in the sink")
        assert logger.close(timeout=0.5) is False
    assert logger.stats["lost"] == 2


def test_a_restarted_writer_goes_on_with_the_mlflow_run_it_started(minilm, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = make_logger(minilm, tmp_path / "run", ["mlflow"],
                         sink_options={"mlflow": {"tracking_uri": uri}})  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger.log(0)
        assert logger.flush(timeout=180) is True
        first = logger.writer_pid
        os.kill(first, signal.SIGKILL)
        logger.log(10)
        assert logger.flush(timeout=180) is True
        assert logger.writer_pid != first
        assert logger.close(timeout=180) is True
    assert any("killed by SIGKILL; restarted it" in m for m in messages(record))
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # one run, not one per writer process
    assert runs[0].info.status == "FINISHED"  # ended by the writer that went on with it
    history = client.get_metric_history(runs[0].info.run_id, "attn.cls.L0")
    assert sorted(m.step for m in history) == [0, 10]


@pytest.mark.slow
def test_an_mlflow_outage_costs_no_step(minilm, tmp_path):
    """A real `mlflow server`, killed while events are logged and started again: the steps logged
    meanwhile wait in the sink's spool and reach the run, none dropped on the way."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from servers import MlflowServer

    server = MlflowServer(tmp_path)
    try:
        server.start()
        logger = make_logger(minilm, tmp_path / "run", ["mlflow"], queue_size=1,
                             sink_options={"mlflow": {"tracking_uri": server.uri}})  # fmt: skip
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for step in (0, 1, 2):  # logged while the writer process starts
                assert logger.log(step)
            assert logger.flush(timeout=300) is True
            server.stop()  # SIGKILL: an outage
            for step in (3, 4, 5, 6):
                assert logger.log(step)
            assert logger.flush(timeout=300) is True  # spooled, not lost
            server.start()
            assert logger.log(7)
            assert logger.close(timeout=300) is True
        client = MlflowClient(server.uri)
        [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
        history = client.get_metric_history(run.info.run_id, "attn.cls.L0")
        assert sorted(m.step for m in history) == list(range(8))
        assert run.info.status == "FINISHED"
        assert logger.stats["lost"] == 0 and logger.stats["dropped"] == 0
    finally:
        server.stop()
