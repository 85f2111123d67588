"""`warn_once`: a repeated condition is said once per process, with its cause."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest

from attnlog.notes import first_time, forget, warn_once


@pytest.fixture(autouse=True)
def _fresh_keys():
    forget()
    yield
    forget()


def test_a_key_is_logged_once_and_other_keys_still_are(caplog):
    with caplog.at_level(logging.WARNING, logger="attnlog"):
        assert warn_once(("index", 1), "attnlog: skipped a damaged line")
        assert not warn_once(("index", 1), "attnlog: skipped a damaged line")
        assert warn_once(("index", 2), "attnlog: skipped two damaged lines")
    assert [r.getMessage() for r in caplog.records] == [
        "attnlog: skipped a damaged line",
        "attnlog: skipped two damaged lines",
    ]
    assert all(r.name == "attnlog" and r.levelno == logging.WARNING for r in caplog.records)


def test_the_cause_ends_the_message(caplog):
    with caplog.at_level(logging.WARNING, logger="attnlog"):
        warn_once("step-5", "attnlog: cannot read step 5", cause=ValueError("truncated file"))
    assert caplog.records[0].getMessage() == (
        "attnlog: cannot read step 5: ValueError: truncated file"
    )


def test_a_category_raises_a_warning_once_pointing_at_the_caller(caplog):
    def render():
        warn_once("no-cjk-font", "attnlog: no CJK font", category=UserWarning)

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        render()
        render()
    assert [str(w.message) for w in caught] == ["attnlog: no CJK font"]
    assert caught[0].filename == __file__  # stacklevel counts from warn_once's caller
    assert caplog.records == []  # a warning, not also a log line, unless a logger is given


def test_a_given_logger_and_level_are_used(caplog):
    mine = logging.getLogger("attnlog.test_notes")
    with caplog.at_level(logging.INFO, logger="attnlog"):
        warn_once("note", "attnlog: a note", logger=mine, level=logging.INFO)
    assert [(r.name, r.levelno) for r in caplog.records] == [("attnlog.test_notes", logging.INFO)]


def test_threads_saying_the_same_thing_say_it_once(caplog):
    start = threading.Barrier(8)

    def say():
        start.wait()
        warn_once("writer-busy", "attnlog: the writer is busy")

    with caplog.at_level(logging.WARNING, logger="attnlog"):
        threads = [threading.Thread(target=say) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(caplog.records) == 1


def test_forget_lets_a_key_be_said_again():
    assert first_time("k") and not first_time("k")
    forget("k")
    assert first_time("k")
