"""AttentionLogger: capture → scores → queue → worker → sinks, for any training loop.

The training thread pays only for the probe pass, the score kernels and a small copy to the CPU.
Rendering and every write happen on one background worker. After construction nothing raises
into training: failures are contained, reported once with their cause, and counted in `stats`
(`strict=True` raises instead, for tests). Configuration errors fail fast in `__init__`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.capture import Capturer, unwrap_model
from attnlog.sinks.base import Sink, describe, sink_factory

log = logging.getLogger("attnlog")

_STOP = object()


@dataclass
class _Event:
    step: int
    snapshot: Any  # host Snapshot
    table: Any  # ScoreTable


class AttentionLogger:
    """Log attention of fixed probe sentences, every time `log(step)` is called.

    Args:
        model: the model being trained (DDP, compile, accelerate and PEFT wrappers are fine).
        tokenizer: its tokenizer.
        probes: sentences, (sentence_a, sentence_b) pairs, a `.txt`/`.jsonl` file, a ProbeSet,
            or None for the built-in set.
        sinks: names ("tensorboard", "mlflow", "archive") or Sink instances. The archive is
            always added unless `archive=False`: the Attention tab and `attnlog report` read it.
        logdir: folder for TensorBoard events and the archive (`<logdir>/plugins/attnlog`).
        patterns: pattern names to score (None: all registered).
        views: bertviz views written per probe and event ("head", "model", "neuron").
        layer_images: also log one token-labelled heatmap per layer and probe. Off by default:
            they are most of the worker's cost (benchmarks/README.md); the model image (all
            layers × heads) is always made, and the TensorBoard Attention tab shows any head
            token-labelled from the archive.
        sink_options: extra keyword arguments per sink name, e.g.
            `{"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}`.
        queue_size: logging events waiting for the worker; when full, the oldest waiting
            event is dropped (counted and reported), so training never waits on I/O.
        is_main_process: only the main process writes. Default: rank 0 of torch.distributed.
        strict: raise errors instead of containing them (for tests).
        check: run one probe pass now, so a model that cannot return attention fails here.
        **capture_options: `max_length`, `on_long`, `batch_size`, `record_qk` (see Capturer).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: Any = None,
        *,
        sinks: Iterable[str | Sink] = ("tensorboard", "mlflow"),
        logdir: str | os.PathLike = "runs/attnlog",
        patterns: Sequence[str] | None = None,
        views: Sequence[str] = ("head", "model", "neuron"),
        layer_images: bool = False,
        archive: bool = True,
        sink_options: dict[str, dict[str, Any]] | None = None,
        alerts: bool = True,
        queue_size: int = 4,
        is_main_process: bool | None = None,
        strict: bool = False,
        check: bool = True,
        **capture_options: Any,
    ) -> None:
        from attnlog import patterns as pattern_registry
        from attnlog.render.event import VIEWS

        unknown = set(views) - set(VIEWS)
        if unknown:
            raise ValueError(f"unknown views {sorted(unknown)}; choose from {list(VIEWS)}")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if patterns is not None:
            unknown = sorted(set(patterns) - set(pattern_registry.PATTERNS))
            if unknown:
                choices = ", ".join(sorted(pattern_registry.PATTERNS))
                raise ValueError(f"unknown patterns {unknown}; choose from {choices}")
        self.patterns = list(patterns) if patterns is not None else None
        self.views = tuple(views)
        self.layer_images = layer_images
        self.strict = strict
        self.logdir = Path(logdir)
        self.is_main_process = _is_main_process() if is_main_process is None else is_main_process
        self.capturer = Capturer(model, tokenizer, probes, **capture_options)
        self.stats: Counter[str] = Counter()
        self._reported: set[str] = set()
        self._logged_steps: set[int] = set()
        self._alerts = None
        if alerts:
            from attnlog.alerts import AlertTracker

            self._alerts = AlertTracker()
        if check:  # before the sinks: a model without attention leaves nothing behind
            self.capturer.check()
        self.sinks: list[Sink] = []
        if self.is_main_process:
            self.sinks = self._make_sinks(sinks, archive, sink_options or {})
        self._settings_logged = False
        self._failure: BaseException | None = None  # strict mode: the worker's first error
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="attnlog-worker", daemon=True)
        if self.is_main_process:
            self._worker.start()
            # A run that crashes never reaches close(): still write what is queued at exit.
            atexit.register(_close_at_exit, weakref.ref(self))

    # -- configuration -----------------------------------------------------------------------

    def _make_sinks(self, sinks, archive: bool, options: dict[str, dict[str, Any]]) -> list[Sink]:
        if isinstance(sinks, (str, Sink)):
            sinks = [sinks]
        names_or_sinks = list(sinks)
        named = {i if isinstance(i, str) else getattr(i, "name", None) for i in names_or_sinks}
        if archive and "archive" not in named:
            names_or_sinks.append("archive")
        made: list[Sink] = []
        for item in names_or_sinks:
            if not isinstance(item, str):
                if not isinstance(item, Sink):
                    raise TypeError(
                        f"{item!r} is not a sink name or a Sink (see attnlog.sinks.Sink)"
                    )
                made.append(item)
                continue
            kwargs = {"logdir": self.logdir, **options.get(item, {})}  # sinks derive their folders
            made.append(sink_factory(item)(**kwargs))
        return made

    # -- the training thread -----------------------------------------------------------------

    def log(self, step: int) -> bool:
        """Capture and score now; hand the rest to the worker. True if the event was queued.

        Never raises after construction (unless `strict`): a failure is reported once,
        counted in `stats`, and training goes on.
        """
        if self._closed:
            return False
        if not self.is_main_process:  # only rank 0 captures and writes
            return False
        started = time.perf_counter()
        event = self._contained("capture", self._prepare, step)
        self.stats["training_thread_ms"] += round((time.perf_counter() - started) * 1000)
        if event is None:
            return False
        while True:
            try:
                self._queue.put_nowait(event)
                break
            except queue.Full:
                try:
                    dropped = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self._queue.task_done()
                self.stats["dropped"] += 1
                self._report_once(
                    "dropped",
                    f"the logging worker fell behind; dropped the event of step {dropped.step} "
                    "(log less often, or with fewer views, to keep every event)",
                )
        self._logged_steps.add(step)
        self.stats["events"] += 1
        return True

    def _prepare(self, step: int) -> _Event:
        snapshot = self.capturer(step)
        if _on_cpu(snapshot):  # the worker can score a float32 copy: the training thread
            return _Event(step, snapshot.to_host(np.float32), None)  # pays only the forward
        return _Event(step, snapshot.to_host(), self._score(snapshot, step))

    def _score(self, snapshot: Any, step: int) -> Any:
        from attnlog import patterns

        table = patterns.score(snapshot, self.patterns, step=step)  # on device, one sync
        if self._alerts is not None:
            table.alerts = self._alerts.update(table)
        return table

    def resume_at(self, step: int) -> None:
        """A run resumed from a checkpoint at `step` replays the steps the interrupted run logged
        after it (same data, same weights): count them as logged, so no sink gets them twice."""
        from attnlog.sinks.archive import read_index

        self._logged_steps |= {e["step"] for e in read_index(self.logdir) if e["step"] > step}

    @property
    def logged_steps(self) -> set[int]:
        return set(self._logged_steps)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        """One event at a time. Nothing escapes: a dead worker would make `flush` wait forever."""
        _lower_thread_priority()  # rendering yields the cores to training when both want them
        while True:
            event = self._queue.get()
            try:
                if event is _STOP:
                    return
                self._write(event)
            except Exception as ex:  # strict mode (re-raised by flush/close), or a bug
                self.stats["errors.worker"] += 1
                if self.strict:
                    self._failure = self._failure or ex
                else:
                    self._report_once("worker", f"writing step {event.step} failed: {_cause(ex)}")
            finally:
                self._queue.task_done()

    def _write(self, event: _Event) -> None:
        from attnlog.render.event import pattern_images, probe_images, probe_views

        if event.table is None:  # captured on the CPU: scored here, off the training thread
            event.table = self._score(event.snapshot, event.step)
        if not self._settings_logged:
            self._settings_logged = True
            settings = self._contained("settings", self.settings)
            if settings:
                self._to_sinks("log_settings", settings)
        step, table = event.step, event.table
        self._to_sinks("log_scores", table, step)
        for probe in event.snapshot.probes:  # one probe's images and pages in memory at a time
            images = self._contained("render", probe_images, probe, step, layers=self.layer_images)
            if images:
                self._to_sinks("log_images", images, step)
            files = self._contained("render", probe_views, probe, step, self.views)
            if files:
                self._to_sinks("log_html", files, step)
        images = self._contained("render", pattern_images, table, step)
        if images:
            self._to_sinks("log_images", images, step)
        self._to_sinks("log_archive", event.snapshot, table, step)

    def _to_sinks(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            self._contained(sink.name, getattr(sink, method), *args, method=method)

    # -- errors ---------------------------------------------------------------------------------

    def _contained(self, what: str, fn, *args, method: str | None = None, **kwargs):
        """Run fn; on error count it in `stats["errors.<what>"]`, report the first per `what`.

        `what` is a stage ("capture", "render") or a sink name: a broken sink is reported once,
        not once per method, and is tried again at the next event (a full disk may clear).
        """
        try:
            return fn(*args, **kwargs)
        except Exception as ex:
            if self.strict:
                raise
            self.stats[f"errors.{what}"] += 1
            doing = f"{what}.{method}" if method else what
            self._report_once(what, f"{doing} failed: {_cause(ex)}")
            return None

    def _report_once(self, key: str, message: str) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        text = f"attnlog: {message} (reported once; training continues; see logger.stats)"
        log.warning(text)
        warnings.warn(text, RuntimeWarning, stacklevel=4)

    # -- lifecycle ------------------------------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """Probes and options, logged once as TensorBoard text and MLflow params.

        Keys are bare (`probe.<name>`): the MLflow sink prefixes them with `attnlog.`.
        """
        config = unwrap_model(self.capturer.model).config
        out = {
            "model_type": describe(getattr(config, "model_type", "")),
            "patterns": ",".join(self.patterns or ["all"]),
            "views": ",".join(self.views),
        }
        for probe in self.capturer.probe_set:
            text = probe.text if probe.pair is None else f"{probe.text} ||| {probe.pair}"
            out[f"probe.{probe.name}"] = describe(text)
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event is written and sinks are flushed. False on time-out."""
        if not self.is_main_process or not self._worker.is_alive():
            return True
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        if not done.wait(timeout):
            return False
        self._to_sinks("flush")
        self._raise_failure()
        return True

    def _raise_failure(self) -> None:
        """strict: the worker's first error, raised in the caller's thread."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Write everything queued, then close every sink. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.is_main_process and self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join()
        self._to_sinks("flush")
        self._to_sinks("close")
        self._raise_failure()

    def __enter__(self) -> AttentionLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cause(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}"


def check_interval(every_n_steps: Any) -> int:
    """The adapters' logging interval: a positive integer, or a clear error at construction."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


def _is_main_process() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _close_at_exit(ref: weakref.ref) -> None:
    logger = ref()
    if logger is not None:
        try:
            logger.close()
        except Exception as ex:  # strict mode: nobody is left to raise to
            log.warning("attnlog: closing at exit failed: %s: %s", type(ex).__name__, ex)


def _on_cpu(snapshot: Any) -> bool:
    probes = snapshot.probes
    return bool(probes) and probes[0].attention.device.type == "cpu"


def _lower_thread_priority() -> None:
    """Linux nice values are per thread: +10 for the worker only."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
