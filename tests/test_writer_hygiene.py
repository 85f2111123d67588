"""The writer process behaves in the user's environment: it imports what the training process
imports, a forked child does not wait for it, and it does no HTML work when no view is asked for.
Real training scripts in subprocesses, real writer processes, the archive read back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from attnlog.layout import read_index
from attnlog.sinks.memory import MemorySink

ROOT = str(Path(__file__).parents[1])
SHADOWED = ("secrets", "json", "pickle", "struct", "signal", "tempfile", "random", "uuid")


def run_script(code: str, script_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    script = script_dir / "train.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


TRAIN = """
    import os, sys
    from transformers import AutoModel, AutoTokenizer
    from attnlog import AttentionLogger
    tok = AutoTokenizer.from_pretrained({path!r})
    model = AutoModel.from_pretrained({path!r})
    log = AttentionLogger(model, tok, ["The cat sat."], sinks=[], logdir={logdir!r}, views=(),
                          close_timeout=2, writer="process")
"""


def test_files_in_the_working_folder_do_not_shadow_the_writers_imports(minilm_path, tmp_path):
    """A user's `secrets.py` (a file of keys) beside where training starts must not break the
    writer: it imports what the training process imports."""
    work, code = tmp_path / "work", tmp_path / "code"
    work.mkdir(), code.mkdir()
    for name in SHADOWED:
        (work / f"{name}.py").write_text(
            f"raise ImportError('the user\\'s {name}.py was imported')"
        )
    logdir = tmp_path / "run"
    done = run_script(TRAIN.format(path=minilm_path, logdir=str(logdir)) + """
    for step in range(2):
        log.log(step)
    assert log.close(timeout=120), "not closed"
    print("STATS", dict(log.stats))
    """, code, work)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was imported" not in done.stderr, done.stderr[-3000:]
    assert [e["step"] for e in read_index(logdir)] == [0, 1]
    assert "'lost'" not in done.stdout and "errors." not in done.stdout, done.stdout


def test_a_forked_child_that_exits_does_not_wait_for_or_stop_the_parents_writer(
    minilm_path, tmp_path
):
    logdir = tmp_path / "run"
    done = run_script(TRAIN.format(path=minilm_path, logdir=str(logdir)) + """
    log.log(0)
    assert log.flush(timeout=120)
    child = os.fork()
    if child == 0:
        print("CHILD EXITS", flush=True)
        sys.exit(0)  # a normal exit: atexit handlers run in the child
    _, status = os.waitpid(child, 0)
    print("CHILD STATUS", status, flush=True)
    log.log(1)
    assert log.close(timeout=120), "not closed"
    print("STATS", dict(log.stats))
    """, tmp_path, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CHILD EXITS" in done.stdout and "CHILD STATUS 0" in done.stdout, done.stdout
    assert "closing did not finish" not in done.stderr, done.stderr[-3000:]
    assert "restarted" not in done.stderr, done.stderr[-3000:]  # the parent's writer lived on
    assert [e["step"] for e in read_index(logdir)] == [0, 1]


def _about_the_html_cap(message: str) -> bool:
    return any(s in message for s in ("no page of views", "over the HTML cap", "cap per view"))


def test_without_views_the_writer_does_no_html_work(minilm, tmp_path, monkeypatch, caplog):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "0.0001234")  # any probe is over it
    probes = ["Without views nothing is pooled for a page."]
    caplog.set_level(logging.WARNING)
    for views in ((), ("head",)):  # the second is the control: the cap does apply to views
        sink = MemorySink()
        with AttentionLogger(model, tokenizer, probes, sinks=[sink], logdir=tmp_path,
                             views=views, archive=False) as logger:  # fmt: skip
            logger.log(0)
        cap_warnings = [r for r in caplog.records if _about_the_html_cap(r.getMessage())]
        if not views:
            assert cap_warnings == [] and sink.of("log_html") == []
            assert not [k for k in logger.stats if k.startswith("errors")]
    assert cap_warnings  # the control: with a view, the cap is checked and said


class ModulesSink(MemorySink):
    """Writes which heavy modules its (writer) process has imported, at each `log_scores`."""

    name = "modules"

    def __init__(self, logdir=None, out: str = "modules.txt") -> None:
        super().__init__()
        self.out = Path(out)

    def log_scores(self, table, step) -> None:
        heavy = ("transformers", "tensorflow", "IPython", "mlflow")
        self.out.write_text(" ".join(m for m in heavy if m in sys.modules) or "none")


def test_the_writer_process_does_not_import_transformers(minilm, tmp_path, monkeypatch):
    """Start-up costs of the writer: it imports what it uses, not the model's library."""
    from attnlog import AttentionLogger
    from attnlog.sinks.base import SINKS

    monkeypatch.setitem(SINKS, "modules", ModulesSink)
    out = tmp_path / "modules.txt"
    model, tokenizer = minilm
    with AttentionLogger(model, tokenizer, ["The cat sat."], sinks=["modules", "tensorboard"],
                         logdir=tmp_path / "run", sink_options={"modules": {"out": str(out)}},
                         writer="process") as logger:  # fmt: skip
        logger.log(0)
        assert logger.flush(timeout=120)
        assert logger.writer_pid != os.getpid()
    assert out.read_text() == "none"
