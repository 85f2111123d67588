"""Two trainings pointed at one logdir: the second is refused when its logger is built, with a
message naming the first, instead of both overwriting each other's archive. Real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from test_sinks_contract import make_snapshot, make_table

from attnlog import AttentionLogger
from attnlog.layout import plugin_dir, read_index
from attnlog.sinks.archive import ArchiveSink
from attnlog.sinks.owner import OWNER, LogdirInUseError, claim, release

PROBES = ["The cat sat on the mat."]

TRAINING = textwrap.dedent(
    """
    import os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from attnlog import AttentionLogger
    tok = AutoTokenizer.from_pretrained({model!r})
    model = AutoModel.from_pretrained({model!r})
    log = AttentionLogger(model, tok, {probes!r}, sinks=[], logdir={logdir!r}, views=(),
                          writer="process")
    log.log(0)
    log.flush()
    print("ready", log.writer_pid, flush=True)
    sys.stdin.readline()  # the test tries its own training meanwhile
    log.log(10)
    if {close!r}:
        log.close()
        print("closed", flush=True)
        sys.stdin.readline()
    else:
        log.flush()
        os.kill(os.getpid(), 9)  # dies without close()
    """
)


def start_training(model: str, logdir, close: bool = True) -> tuple[subprocess.Popen, int]:
    """A training process logging to `logdir`; (process, its writer's pid) once step 0 is in."""
    code = TRAINING.format(model=model, probes=PROBES, logdir=str(logdir), close=close)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], f"the training did not start: {line}"
    return proc, int(line[1])


def proceed(proc: subprocess.Popen) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def steps(logdir) -> list[int]:
    return [e["step"] for e in read_index(logdir)]


@pytest.mark.slow
def test_a_second_training_is_refused_until_the_first_closes(minilm, minilm_path, tmp_path):
    model, tokenizer = minilm
    first, writer_pid = start_training(minilm_path, tmp_path)
    try:
        with pytest.raises(LogdirInUseError) as refused:
            AttentionLogger(model, tokenizer, PROBES, sinks=[], logdir=tmp_path, views=())
        message = str(refused.value)
        assert f"pid {first.pid}" in message and "its own logdir" in message
        assert str(plugin_dir(tmp_path) / OWNER) in message  # what to delete if it is stale
        with pytest.raises(LogdirInUseError):  # a bare archive sink in a third process too
            ArchiveSink(tmp_path)
        assert steps(tmp_path) == [0]  # nothing of the refused training was written

        os.kill(writer_pid, signal.SIGKILL)  # the first training's writer dies: its restart
        assert proceed(first) == "closed"  # is not refused, and step 10 is written
        assert steps(tmp_path) == [0, 10]
    finally:
        first.kill()
        first.wait(timeout=60)

    # closed: the logdir is free again (the first process still runs)
    with AttentionLogger(model, tokenizer, PROBES, sinks=[], logdir=tmp_path, views=()) as log:
        log.log(20)
    assert steps(tmp_path) == [0, 10, 20]


@pytest.mark.slow
def test_a_training_that_died_does_not_block_the_next(minilm, minilm_path, tmp_path):
    model, tokenizer = minilm
    crashed, _ = start_training(minilm_path, tmp_path, close=False)
    proceed(crashed)
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((plugin_dir(tmp_path) / OWNER).read_text())["pid"] == crashed.pid
    with AttentionLogger(model, tokenizer, PROBES, sinks=[], logdir=tmp_path, views=()) as log:
        log.log(20)  # a resumed run
    assert steps(tmp_path) == [0, 10, 20]


def lock_of(logdir, **owner) -> None:
    path = plugin_dir(logdir) / OWNER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "since": "earlier", **owner}))


def test_a_reused_pid_or_a_damaged_lock_is_stale(tmp_path):
    lock_of(tmp_path, pid=os.getppid(), start=-1)  # alive, but not the process that claimed
    claim(tmp_path)
    assert json.loads((plugin_dir(tmp_path) / OWNER).read_text())["pid"] == os.getpid()
    (plugin_dir(tmp_path) / OWNER).write_bytes(b'{"pid": 12')  # torn by a crash
    claim(tmp_path)
    release(tmp_path)
    assert (plugin_dir(tmp_path) / OWNER).read_bytes() == b""
    ArchiveSink(tmp_path).log_archive(make_snapshot(0), make_table(0), 0)


def test_a_claim_from_another_host_is_respected(tmp_path):
    lock_of(tmp_path, pid=1, host="elsewhere")  # its pid cannot be checked from here
    with pytest.raises(LogdirInUseError, match="pid 1 on elsewhere"):
        claim(tmp_path)
    release(tmp_path)  # not ours: kept
    with pytest.raises(LogdirInUseError):
        ArchiveSink(tmp_path)


def test_the_same_process_and_a_writer_process_may_claim_again(tmp_path):
    claim(tmp_path)
    claim(tmp_path)  # a second logger in the same process (a notebook cell run again)
    ArchiveSink(tmp_path).log_archive(make_snapshot(0), make_table(0), 0)
    child = subprocess.run(  # a writer process: its parent owns the archive
        [sys.executable, "-c", f"from attnlog.sinks.archive import ArchiveSink; "
         f"ArchiveSink({str(tmp_path)!r})"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    release(tmp_path)
