"""The archive, its readers and the TensorBoard sink under damage: damaged runs, torn index
lines, two writers on one logdir, a full disk, and bad requests to the Attention tab.

Every test here failed on the code before the fix (each says how)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from servers import free_port, get_json, start_tensorboard
from test_sinks_contract import make_snapshot, make_table

from attnlog.cli import main
from attnlog.compare import compare
from attnlog.layout import archive_name, plugin_dir, read_index
from attnlog.report import load, report, same_scores, score_differences, strongest_heads
from attnlog.sinks.archive import ArchiveSink, write_all

TESTS = Path(__file__).parent


def archive(logdir: Path, steps=(0, 10, 20)) -> None:
    sink = ArchiveSink(logdir)
    for step in steps:
        sink.log_archive(make_snapshot(step), make_table(step), step)


def damage(logdir: Path) -> None:
    """A damaged run: an indexed step whose `.npz` is gone, a `{}` line, bytes that
    are not UTF-8, and a truncated `.npz` for the last step."""
    archive(logdir, (30, 40))
    folder = plugin_dir(logdir)
    (folder / archive_name(30)).unlink()
    last = folder / archive_name(40)
    last.write_bytes(last.read_bytes()[:200])
    with open(folder / "index.jsonl", "ab") as fh:
        fh.write(b"{}\n\xff\xfe\x00garbage\n[1, 2]\n")


# ---- one damaged run ---------------------------------------------------------------------------


def test_damaged_index_lines_are_skipped_with_one_warning(tmp_path, caplog):
    archive(tmp_path)
    damage(tmp_path)  # before: UnicodeDecodeError, then KeyError 'step'
    with caplog.at_level("WARNING", logger="attnlog"):
        for _ in range(3):
            assert [e["step"] for e in read_index(tmp_path)] == [0, 10, 20, 30, 40]
    assert len([r for r in caplog.records if "damaged line" in r.getMessage()]) == 1


def test_report_and_compare_skip_missing_and_truncated_steps(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    archive(good)
    archive(bad)
    damage(bad)  # before: BadZipFile / KeyError tracebacks
    assert main(["report", str(bad)]) == 0
    out = capsys.readouterr()
    assert "step 20, probes: cat, pair" in out.out  # the last readable step
    assert "logged steps (5): 0, 10, 20, 30, 40" in out.out
    assert main(["report", str(bad), "--step", "40"]) == 1
    assert "missing or damaged" in capsys.readouterr().err
    assert "A: " in compare(good, bad) and "(step 20)" in compare(good, bad)
    assert load(bad).step == 20 and set(load(bad).scores) == set(make_table().scores)


def test_report_and_sync_on_a_path_without_a_run_exit_non_zero(tmp_path, capsys):
    not_a_run = tmp_path / "passwd"
    not_a_run.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty").mkdir()
    for path in (not_a_run, tmp_path / "empty"):
        assert main(["sync", str(path)]) == 1  # before: "sent 0", exit 0
        assert "no attnlog run in" in capsys.readouterr().err
        assert main(["report", str(path)]) == 1
        assert "attnlog report: error:" in capsys.readouterr().err


# ---- torn last line, short writes ----------------------------------------------------------------


def test_a_torn_last_line_does_not_swallow_the_next_step(tmp_path):
    archive(tmp_path, (0,))
    index = plugin_dir(tmp_path) / "index.jsonl"
    with open(index, "ab") as fh:
        fh.write(b'{"step": 5, "file": "step_000')  # a crash mid-write: no newline
    archive(tmp_path, (10,))  # before: glued onto the torn line, so step 10 was lost
    assert [e["step"] for e in read_index(tmp_path)] == [0, 10]
    assert index.read_bytes().endswith(b"\n")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that can really fill up (needs root; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Fill the disk of `folder` to the last byte; delete the returned file to free it."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


def test_a_short_write_is_not_ignored(tiny_tmpfs):
    target = tiny_tmpfs / "index.jsonl"
    target.write_bytes(b"x")  # one byte: the rest of its page is the only room left
    fill(tiny_tmpfs)
    line = b"y" * 20000
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    try:
        written = os.write(fd, line)  # what the old code did: a silently short line
        assert 0 < written < len(line)
        with pytest.raises(OSError):
            write_all(fd, line)
    finally:
        os.close(fd)


# ---- the TensorBoard sink after a full disk ----------------------------------------------------


# TensorBoard's own writer thread dies with the full disk (that is the bug): pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_sink_recovers_after_a_full_disk(tiny_tmpfs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from attnlog.sinks.tensorboard import TensorBoardSink

    rng = np.random.default_rng(0)

    def image():  # noise: PNG cannot shrink it, so every event needs fresh disk space
        return {"attention/cat/model": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}

    run = tiny_tmpfs / "run"
    sink = TensorBoardSink(run)
    sink.log_images(image(), 0)
    sink.flush()
    ballast = fill(tiny_tmpfs)
    failures = 0
    for step in (1, 2):
        for call in (lambda s=step: sink.log_images(image(), s), sink.flush):
            try:
                call()
            except OSError:
                failures += 1
    assert failures, "the full disk was never noticed"
    ballast.unlink()
    for step in (3, 4):  # before: every later event failed with the dead writer thread
        sink.log_images(image(), step)
        sink.flush()
    sink.close()
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    steps = [e.step for e in acc.Images("attention/cat/model")]
    assert steps[0] == 0 and steps[-2:] == [3, 4]


# ---- two processes on one logdir -------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_sinks_contract import make_snapshot, make_table
    from attnlog.sinks.archive import ArchiveSink

    sink = ArchiveSink({logdir!r})
    for round in range(2):  # the second round rewrites every index line while the other appends
        for step in range({steps}):
            sink.log_archive(make_snapshot(step), make_table(step), step)
    """
)


def test_two_processes_on_one_logdir_lose_no_step(tmp_path):
    steps = 25
    code = WRITER.format(tests=str(TESTS), logdir=str(tmp_path), steps=steps)
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in "ab"]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors  # before: CRC errors, failed renames
    index = read_index(tmp_path)
    assert [e["step"] for e in index] == list(range(steps))  # before: appended steps lost
    lines = (plugin_dir(tmp_path) / "index.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    for entry in index:
        assert load(plugin_dir(tmp_path) / entry["file"]).step == entry["step"]
    assert not list(plugin_dir(tmp_path).glob("*.tmp"))


# ---- temporaries of failed saves ------------------------------------------------------------------


def test_temporaries_of_dead_saves_are_removed(tmp_path):
    folder = plugin_dir(tmp_path)
    folder.mkdir(parents=True)
    legacy = folder / "step_00000001.npz.tmp"  # the old fixed name
    dead = folder / "step_00000002.npz.999999999.0a1b2c3d.tmp"  # no such process
    parent = os.getppid()  # alive: another writer's save in progress is kept
    live = folder / f"step_00000003.npz.{parent}.0a1b2c3d.tmp"
    for path in (legacy, dead, live):
        path.write_bytes(b"half an archive")
    archive(tmp_path, (5,))
    assert not legacy.exists() and not dead.exists() and live.exists()


def test_a_save_that_fails_on_a_full_disk_leaves_no_temporary(tiny_tmpfs):
    run = tiny_tmpfs / "run"
    sink = ArchiveSink(run)
    sink.log_archive(make_snapshot(0), make_table(0), 0)
    ballast = fill(tiny_tmpfs)
    with pytest.raises(OSError):
        sink.log_archive(make_snapshot(1, layers=8), make_table(1), 1)
    assert not list(plugin_dir(run).glob("*.tmp"))  # before: step_00000001.npz.tmp stayed
    ballast.unlink()
    sink.log_archive(make_snapshot(1), make_table(1), 1)
    assert [e["step"] for e in read_index(run)] == [0, 1]


# ---- identical scores shown once ------------------------------------------------------------------


def test_identical_scores_are_ranked_once():
    a = {name: m.copy() for name, m in make_table(1).scores.items()}
    b = {name: m.copy() for name, m in make_table(2).scores.items()}
    for scores in (a, b):
        scores["sink"] = scores["cls"].copy()  # BERT: [CLS] is the first token
    assert same_scores(a, b)["cls"] == ["sink"]
    rows = score_differences(a, b)
    assert not any(pattern == "sink" for _, pattern, _, _ in rows)
    assert len({(p, layer, head) for _, p, layer, head in rows}) == len(rows)
    strongest = strongest_heads(a)
    assert [r["pattern"] for r in strongest].count("cls") == 1
    assert "sink" not in [r["pattern"] for r in strongest]
    assert next(r for r in strongest if r["pattern"] == "cls")["same_as"] == ["sink"]


def test_report_names_identical_patterns_together(tmp_path):
    table = make_table(0)
    table.scores["sink"] = table.scores["cls"].copy()
    ArchiveSink(tmp_path).log_archive(make_snapshot(0), table, 0)
    text = report(tmp_path)
    assert "cls (= sink)" in text
    assert "\n  sink " not in text


# ---- the Attention tab in a real TensorBoard ----------------------------------------------------


def fetch(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_attention_tab_serves_the_rest_of_a_damaged_logdir(tmp_path):
    pytest.importorskip("tensorboard")
    archive(tmp_path / "good")
    archive(tmp_path / "bad")
    damage(tmp_path / "bad")
    port = free_port()
    server = start_tensorboard(tmp_path, port)
    base = f"http://127.0.0.1:{port}/data/plugin/attnlog"

    def url(route: str, **query) -> str:
        return f"{base}/{route}?{urllib.parse.urlencode(query)}"

    try:
        runs = get_json(f"{base}/runs", time.monotonic() + 90)  # before: 500, no run listed
        assert [s["step"] for s in runs["good"]] == [0, 10, 20]
        assert [s["step"] for s in runs["bad"]][:3] == [0, 10, 20]
        assert 30 not in [s["step"] for s in runs["bad"]]  # its file is gone
        status, trend = fetch(url("trend", run="bad", pattern="cls", layer=0, head=0))
        assert status == 200 and trend["steps"] == [0, 10, 20]  # before: 500 on the truncated file
        status, body = fetch(url("scores", run="bad", step=40))
        assert status == 404 and "missing or damaged" in body["error"]
        _, runs = fetch(f"{base}/runs")
        assert [s["step"] for s in runs["bad"]] == [0, 10, 20]  # the bad file is now known

        # client mistakes are 400/404, never 500
        for query, codes in [
            (dict(run="r" * 300, step=0), (404,)),  # before: 500 (file name too long)
            (dict(run="r" * 2000, step=0), (400,)),
            (dict(run="good", step="１"), (400,)),  # full-width digit: before, served step 1
            (dict(run="good", step="٣"), (400,)),  # Arabic-Indic digit
        ]:
            status, body = fetch(url("scores", **query))
            assert status in codes and "error" in body, (query, status, body)
        status, body = fetch(url("trend", run="good", pattern="cls", layer=99, head=0))
        assert status == 400 and "out of range" in body["error"]
        status, body = fetch(url("attention", run="good", step=0, probe="cat", layer=0, head=99))
        assert status == 400 and "out of range" in body["error"]
    finally:
        server.terminate()
        server.wait(timeout=20)
