"""The writer process's loop: frames in on stdin, acknowledgements out on stdout."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import Counter

from attnlog.writer.contain import cause
from attnlog.writer.events import EventWriter, WriterConfig
from attnlog.writer.frames import encode, receive, write_frame

__all__ = ["main"]


def main() -> int:
    """`python -m attnlog.writer`: write every event received, acknowledge each, then exit."""
    acks = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of sinks and libraries go to stderr, never into the frames
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops training; we finish writing
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)
    frames = os.fdopen(0, "rb")
    first = receive(frames)
    if first is not None and first[0] == "warm":  # a spare (process.prestart): import, then wait
        _one_thread()
        _import(first[1])
        first = receive(frames)
    if first is None:
        return 0
    _, config = first
    if config.environ is not None:  # a spare, started before training: the environment of now
        os.environ.clear()
        os.environ.update(config.environ)
    sys.path.extend(p for p in config.sys_path if p not in sys.path)
    _one_thread()
    _serve(config, frames, acks)
    _exit_now(acks)
    return 0  # not reached


def _serve(config: WriterConfig, frames, acks) -> None:
    reports: list[tuple[str, str]] = []
    reported: set[str] = set()

    def report(key: str, message: str) -> None:
        if key not in reported:
            reported.add(key)
            reports.append((key, message))

    def resume(options: dict) -> None:
        write_frame(acks, encode(("resume", options)))

    writer = EventWriter.from_config(config, report=report, on_resume=resume)
    sent_stats: Counter[str] = Counter()
    cpu_before = time.process_time()
    while True:
        try:
            message = receive(frames)
        except EOFError:  # the training process died mid-frame
            message = None
        if message is None:  # the training process is gone: write what we have, then stop
            writer.close()
            return
        kind, seq, *rest = message
        if kind == "event":
            writer.write(rest[0])
        elif kind == "flush":
            writer.flush()
        else:
            writer.close()
        cpu = time.process_time()
        writer.stats["writer_cpu_ms"] += round((cpu - cpu_before) * 1000)
        cpu_before = cpu
        delta = writer.stats - sent_stats
        sent_stats = Counter(writer.stats)
        failure = writer.take_failure()
        write_frame(acks, encode(("ack", seq, dict(delta), reports[:], failure and cause(failure))))
        reports.clear()
        if kind == "close":
            return


def _exit_now(acks) -> None:
    """Exit without the interpreter's teardown, about a second of CPU with torch and MLflow
    loaded, which the end of training waited for: the sinks are closed and every
    acknowledgement is written by now."""
    for stream in (acks, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _import(modules: list[str]) -> None:
    """Import ahead what the first event will need; one that fails is met again there."""
    import importlib

    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _one_thread() -> None:
    """Scoring and rendering on one core: the training process keeps the others."""
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)
