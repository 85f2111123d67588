"""The writer process: real child processes, real TensorBoard files and MLflow store read back.

Sinks that must run inside the writer process are defined here and registered by name, so the
child imports them from this module (the logger passes its `sys.path` on).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from attnlog.sinks.memory import MemorySink

PROBES = ["The cat sat on the mat.", ("The cat sat.", "It was happy.")]
TESTS = str(Path(__file__).parent)
ROOT = str(Path(__file__).parents[1])


class GateSink(MemorySink):
    """Holds every `log_archive` until `<folder>/open` exists; `<folder>/entered-<step>` says
    it got there. Never opened, it is a sink that hangs."""

    name = "gate"

    def __init__(self, logdir=None, folder: str = ".") -> None:
        super().__init__()
        self.folder = Path(folder)

    def log_archive(self, snapshot, table, step) -> None:
        (self.folder / f"entered-{step}").touch()
        deadline = time.monotonic() + 300
        while not (self.folder / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_for(condition, what: str, seconds: float = 120.0):
    """Poll until `condition()` is true; fail naming `what` if it never is (not a timing test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def scalar_steps(logdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(set(steps))


def attnlog_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def gate(monkeypatch, tmp_path):
    """The `gate` sink registered by name; its folder."""
    from attnlog.sinks.base import SINKS

    monkeypatch.setitem(SINKS, "gate", GateSink)
    folder = tmp_path / "gate"
    folder.mkdir()
    return folder


def make_logger(minilm, logdir, sinks, **options):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    options.setdefault("views", ("head",))
    options.setdefault("writer", "process")  # `auto` picks the thread on a CPU this small
    return AttentionLogger(model, tokenizer, PROBES, sinks=sinks, logdir=logdir, **options)


def test_the_writer_process_writes_tensorboard_and_the_archive(minilm, tmp_path):
    from attnlog.layout import read_index

    logdir = tmp_path / "run"
    with make_logger(minilm, logdir, ["tensorboard"]) as logger:
        assert logger.log(0) and logger.log(5)
        assert logger.flush(timeout=120)
        pid = logger.writer_pid
        assert pid is not None and pid != os.getpid()
        assert logger.sinks == []  # nothing renders or writes in the training process
    assert scalar_steps(logdir, "patterns/cls/max") == [0, 5]
    assert [e["step"] for e in read_index(logdir)] == [0, 5]
    html = logdir / "plugins" / "attnlog" / "html" / "attention"
    assert sorted(p.name for p in html.iterdir()) == ["step_00000000.html", "step_00000005.html"]
    assert logger.stats["events"] == 2 and logger.stats["writer_cpu_ms"] > 0
    assert not [k for k in logger.stats if k.startswith(("errors", "lost", "dropped"))]
    with pytest.raises(ProcessLookupError):  # closed: the writer exited
        os.kill(pid, 0)


def test_a_killed_writer_is_restarted_and_the_event_it_held_is_written(minilm, tmp_path, gate):
    from attnlog.layout import read_index

    logdir = tmp_path / "run"
    logger = make_logger(minilm, logdir, ["tensorboard", "gate"],
                         sink_options={"gate": {"folder": str(gate)}})  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert logger.log(0)
        wait_for(lambda: (gate / "entered-0").exists(), "the writer to hold step 0")
        first = logger.writer_pid
        os.kill(first, signal.SIGKILL)  # mid-event: step 0 is in TensorBoard, not archived
        (gate / "open").touch()
        assert logger.log(1)  # training goes on
        assert logger.flush(timeout=120)
        assert logger.writer_pid != first
        logger.log(2)
        assert logger.close(timeout=120)
    assert [e["step"] for e in read_index(logdir)] == [0, 1, 2]  # step 0 was resent
    assert scalar_steps(logdir, "patterns/cls/max") == [0, 1, 2]
    assert logger.stats["writer_restarts"] == 1 and logger.stats["lost"] == 0
    [report] = attnlog_warnings(record)
    assert "the writer process was killed by SIGKILL; restarted it" in report


def test_a_hung_sink_bounds_flush_and_close_and_names_the_steps(minilm, tmp_path, gate):
    logger = make_logger(minilm, tmp_path / "run", ["gate"], views=(),
                         sink_options={"gate": {"folder": str(gate)}})  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger.log(0)
        wait_for(lambda: (gate / "entered-0").exists(), "the writer to hang in the sink")
        pid = logger.writer_pid
        assert logger.flush(timeout=0.5) is False
        assert logger.close(timeout=0.5) is False
    flush, close = attnlog_warnings(record)
    assert "flush did not finish within 0.5 s" in flush and "steps [0]" in flush
    assert "nothing was written for 0.5 s" in close and "left unwritten: steps [0]" in close
    with pytest.raises(ProcessLookupError):  # the hung writer was stopped, not left behind
        os.kill(pid, 0)


def test_a_hung_sink_on_the_thread_leaks_no_thread_per_flush(minilm, tmp_path):
    from test_logger import BlockingSink

    sink = BlockingSink()
    logger = make_logger(minilm, tmp_path, [sink], views=(), archive=False)
    try:
        logger.log(0)
        assert sink.entered.wait(timeout=60)
        before = threading.active_count()
        assert [logger.flush(timeout=0.05) for _ in range(5)] == [False] * 5
        assert threading.active_count() == before
        assert logger.close(timeout=0.05) is False
    finally:
        sink.release.set()


def test_the_trainers_mlflow_run_is_joined_by_the_writer_process(minilm, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # in this process only: the writer must be told
    try:
        with mlflow.start_run() as run:
            mlflow.log_metric("train/loss", 1.0, step=0)
            with make_logger(minilm, tmp_path / "run", ["mlflow"], views=()) as logger:
                logger.log(0)
            assert mlflow.active_run().info.run_id == run.info.run_id  # not ended by attnlog
    finally:
        mlflow.set_tracking_uri(
            None
        )  # also unsets MLFLOW_TRACKING_URI, which set_tracking_uri sets
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    metrics = runs[0].data.metrics
    assert "train/loss" in metrics and "attn.cls.L0" in metrics


def test_the_first_writer_is_the_spare_started_early_with_the_environment_of_now(
    minilm, tmp_path, monkeypatch
):
    """The Trainer callback starts the writer process when the Trainer is built (`prestart`), so
    that its imports overlap the Trainer's set-up. The first logger takes that process, and it
    runs with the environment of the first event, not of when it started."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from attnlog.writer import process

    process.prestart(["mlflow"])
    spare = process._spare
    assert spare is not None and spare.poll() is None
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "set-after-the-spare-started")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = {"mlflow": {"tracking_uri": uri}}
    with make_logger(minilm, tmp_path / "run", ["mlflow"], views=(), sink_options=options) as log:
        assert log.log(0) and log.flush()
        assert log.writer_pid == spare.pid
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("set-after-the-spare-started")
    assert experiment is not None and client.search_runs([experiment.experiment_id])
    assert process._spare is None  # taken: the next writer starts its own


def test_a_spare_is_not_used_once_stderr_goes_elsewhere(minilm, tmp_path):
    """Its messages would go to the stderr it inherited: a new writer is started instead."""
    from attnlog.writer import process

    process.prestart([])
    spare = process._spare
    saved = os.dup(2)
    try:
        with open(tmp_path / "stderr.txt", "w") as file:
            os.dup2(file.fileno(), 2)
            with make_logger(minilm, tmp_path / "run", [], views=()) as log:
                assert log.log(0) and log.flush()
                assert log.writer_pid not in (None, spare.pid)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert spare.wait(timeout=60) == 0  # told to stop: end of file on its stdin


def test_a_spare_nobody_takes_stops_by_itself(monkeypatch):
    """A Trainer built and never trained must not leave a writer process idling."""
    from attnlog.writer import process

    monkeypatch.setattr(process, "SPARE_IDLE_S", 1.0)
    process.prestart([])
    spare = process._spare
    assert spare.wait(timeout=120) == 0 and process._spare is None


def _run_script(code: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([TESTS, ROOT])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_a_script_without_a_main_guard_trains_once(minilm_path, tmp_path):
    """spawn would re-run this script in the writer; `python -m attnlog.writer` does not."""
    from attnlog.layout import read_index

    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
        from attnlog import AttentionLogger
        print("TRAINING STARTS", flush=True)
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained({minilm_path!r})
        model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = tok(["a b c", "d e f g"], padding=True, return_tensors="pt")
        log = AttentionLogger(model, tok, ["The cat sat."], sinks=["tensorboard"], logdir="run",
                              writer="process")
        for step in range(3):
            model(**batch, labels=torch.tensor([0, 1])).loss.backward()
            opt.step(); opt.zero_grad()
            log.log(step)
        print("HEAVY", [m for m in ("tensorboard", "mlflow")
                        if m in sys.modules], flush=True)
        # no close(): the exit handler writes what is queued
    """)
    done = _run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("TRAINING STARTS") == 1, done.stdout
    assert "HEAVY []" in done.stdout  # the training process never imported a sink's backend
    assert [e["step"] for e in read_index(tmp_path / "run")] == [0, 1, 2]
    assert scalar_steps(tmp_path / "run", "patterns/cls/max") == [0, 1, 2]


def test_exit_with_a_hung_sink_is_bounded_and_says_what_was_left(minilm_path, tmp_path, gate):
    script = textwrap.dedent(f"""
        from transformers import AutoModel, AutoTokenizer
        from attnlog import AttentionLogger, register_sink
        from test_writer import GateSink
        register_sink("gate", GateSink)
        tok = AutoTokenizer.from_pretrained({minilm_path!r})
        model = AutoModel.from_pretrained({minilm_path!r})
        log = AttentionLogger(model, tok, ["The cat sat."], sinks=["gate"], logdir="run",
                              views=(), close_timeout=1, writer="process",
                              sink_options={{"gate": {{"folder": {str(gate)!r}}}}})
        log.log(7)
        import pathlib, time
        while not pathlib.Path({str(gate)!r}, "entered-7").exists():  # the writer hangs in it
            time.sleep(0.05)
    """)
    done = _run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "closing did not finish: nothing was written for 1 s" in done.stderr
    assert "left unwritten: steps [7]" in done.stderr


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_training_is_bit_identical_with_either_writer(minilm_path, tmp_path, writer):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from attnlog import AttentionLogger

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(["a b c", "d e f g"], padding=True, return_tensors="pt")

    def train(with_logger: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64)  # fmt: skip
        model = BertForSequenceClassification(config)  # dropout on: RNG state matters
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        logger = None
        if with_logger:
            logger = AttentionLogger(model, tokenizer, PROBES, sinks=["tensorboard"],
                                     logdir=tmp_path, views=("head",), writer=writer)  # fmt: skip
        for step in range(4):
            model(**batch, labels=torch.tensor([0, 1])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if logger is not None:
                assert logger.log(step)
        if logger is not None:
            assert logger.close(timeout=120)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain, logged = train(False), train(True)
    assert all(torch.equal(plain[k], logged[k]) for k in plain)


def test_a_sink_object_runs_on_a_thread_and_the_named_sinks_in_the_writer_process(
    minilm, tmp_path, monkeypatch
):
    from attnlog import notes
    from attnlog.layout import read_index

    notes.forget()  # the note is said once per process

    memory = MemorySink()
    logdir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with make_logger(minilm, logdir, [memory, "tensorboard"]) as logger:
            assert logger.log(0) and logger.log(1)
            assert logger.flush(timeout=120)
            pid = logger.writer_pid
            assert pid is not None and pid != os.getpid()
            assert logger.sinks == [memory]  # only the object lives in the training process
    assert memory.steps("log_archive") == [0, 1] and memory.closed
    assert scalar_steps(logdir, "patterns/cls/max") == [0, 1]  # written by the writer process
    assert [e["step"] for e in read_index(logdir)] == [0, 1]
    [note] = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert "the sink MemorySink is an object" in note
    assert "the named sinks run in the writer process" in note
    assert not [k for k in logger.stats if k.startswith(("errors", "lost"))]
