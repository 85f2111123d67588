"""AttentionLogger: the training process's side of logging — measure, then hand off.

`log(step)` runs the probe pass and hands its host copy to the writer (`attnlog.writer`), which
scores, renders and writes to every sink in another process or on a thread (`writer`). After
construction `log()` never raises for a logging failure: failures are contained, reported once
with their cause, and counted in `stats` (`strict=True` raises them at `flush`/`close` instead,
for tests). Configuration errors fail fast in `__init__`, and a wrong argument to `log()`
itself raises TypeError, like any mistyped call.
"""

from __future__ import annotations

import atexit
import logging
import operator
import os
import sys
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from attnlog.capturing import Capturer, unwrap_model
from attnlog.settings import check_environment
from attnlog.sinks.base import Sink, describe
from attnlog.sinks.owner import claim, release
from attnlog.writer import (
    Containment,
    Event,
    ProcessWriter,
    ThreadWriter,
    WriterConfig,
    cause,
)
from attnlog.writer.plan import active_mlflow_run, build_writer, choose_writer, plan_sinks
from attnlog.writer.spill import DEFAULT_SPILL_MB, Spill, spill_root
from attnlog.writer.split import SplitWriter

__all__ = ["AttentionLogger", "check_interval", "check_options"]

log = logging.getLogger("attnlog")

WRITERS = ("auto", "process", "thread")


class AttentionLogger:
    """Log attention of fixed probe sentences, every time `log(step)` is called.

    Args:
        model: the model being trained (DDP, compile, accelerate and PEFT wrappers are fine).
        tokenizer: its tokenizer.
        probes: sentences, (sentence_a, sentence_b) pairs, a `.txt`/`.jsonl` file, a ProbeSet,
            or None for the built-in set.
        sinks: names ("tensorboard", "mlflow", "archive", or one given to `register_sink`) or
            Sink objects. None (the default): TensorBoard and MLflow, those whose packages are
            installed (said once). `[]`: no sink but the archive. The archive is always added
            unless `archive=False`: the Attention tab and `attnlog report` read it.
        logdir: folder for TensorBoard events and the archive (`<logdir>/plugins/attnlog`).
        patterns: pattern names to score (None: all registered; `[]` is an error).
        views: bertviz views, tabs of one page per event (`attention/step_<8 digits>.html`):
            "head", "model", "neuron", "head_words", "model_words" (one name or several; `()`
            for none). Add "per_probe" for one page per probe and view instead.
        views_every: write the page of views at every k-th event only (the first included),
            for runs that log often; heatmaps, scores and the archive come with every event.
        layer_images: also log one token-labelled heatmap per layer and probe. Off by default:
            they are most of the writer's cost (benchmarks/README.md); the model image (all
            layers × heads) is always made, and the TensorBoard Attention tab shows any head
            token-labelled from the archive.
        sink_options: extra keyword arguments per sink name, e.g.
            `{"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}`.
        queue_size: events waiting for the writer in memory. More wait on disk, in order,
            under `<logdir>/attnlog-outbox/` (written by a background thread: training never
            waits), and are written when the writer gets to them.
        spill_mb: the most that events waiting on disk may take (MiB). Past it an event is
            dropped, counted in `stats["dropped"]` and `stats["lost"]`, and named in a warning.
        writer: where events are rendered and written.
            "auto" (default): the thread writer when the model trains on the CPU and torch's
            threads already fill every core; the writer process otherwise (on an accelerator,
            or when torch leaves cores free). Decided at the first event, so a model moved to
            its GPU after the logger was built gets the process.
            "process": a writer process (`python -m attnlog.writer`, started at the first
            event). Rendering and the tracking clients hold Python's GIL for about a second per
            event; in a process of their own they cannot slow the training loop, which on a
            GPU is mostly Python launching kernels. A writer that dies is restarted and its
            events resent. Its start-up (about 3 s of CPU: torch, MLflow and its database
            store) and its ~0.5 GiB are worth it only where it has a core of its own.
            "thread": a thread of the training process. Nothing extra to start, but each
            event's rendering competes with training for the GIL: on an H200 that slowed
            training by about 60 % at one event every 50 steps. With every core training on
            the CPU it costs less than the process (benchmarks/README.md, Trainer check). Also
            for notebooks that cannot start processes, or sinks that must live in the training
            process.
            Sink objects (not names) cannot be rebuilt in another process: they run on the
            thread (which renders for them), with a one-time note, while the named sinks stay
            in the writer process. Sink options that cannot be pickled (a `SummaryWriter`) put
            every sink on the thread. To move a custom sink into the writer process,
            `register_sink("name", MySink)` in an importable module and pass "name".
        close_timeout: seconds that `flush()` waits at most, and that `close()` and the exit
            handler wait without any event being written (a hung sink), before they give up
            and say which steps were left unwritten. A slow writer that keeps writing is waited
            for; a hung one is stopped.
        is_main_process: only the main process writes. Default: rank 0 of torch.distributed.
            Under sharded training (FSDP, ZeRO-3) every rank must call `log()`: all join the
            probe pass, rank 0 hands it off.
        strict: raise errors instead of containing them (for tests).
        check: run one probe pass now, so a model that cannot return attention fails here.
        **capture_options: `max_length`, `on_long`, `batch_size`, `record_qk`,
            `full_attention_limit`, `pooled_size`, `archive_mb`, `chunked_above`,
            `induction_probe` (see Capturer).

    Attributes:
        stats: counters: `events`; `lost` (every event handed over and not written), of which
            `dropped` (the outbox on disk was full) and `set_aside` (an event that killed the
            writer process twice, kept in `<logdir>/attnlog-outbox/set-aside/`);
            `writer_restarts`, `errors.<where>`, `training_thread_ms` (the training process's
            share) and `writer_cpu_ms`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: Any = None,
        *,
        sinks: Iterable[str | Sink] | str | Sink | None = None,
        logdir: str | os.PathLike = "runs/attnlog",
        patterns: Sequence[str] | None = None,
        views: Sequence[str] | str = ("head", "model", "neuron"),
        views_every: int = 1,
        layer_images: bool = False,
        archive: bool = True,
        sink_options: dict[str, dict[str, Any]] | None = None,
        alerts: bool = True,
        queue_size: int = 4,
        spill_mb: float = DEFAULT_SPILL_MB,
        writer: str = "auto",
        close_timeout: float = 60.0,
        is_main_process: bool | None = None,
        strict: bool = False,
        check: bool = True,
        **capture_options: Any,
    ) -> None:
        check_environment()
        self.views = _check_views(views)
        self.views_every = check_interval(views_every, "views_every")
        self.patterns = _check_patterns(patterns)
        _check_writer_options(queue_size, spill_mb, writer, close_timeout)
        self.layer_images = layer_images
        self.strict = strict
        self.close_timeout = float(close_timeout)
        self.logdir = Path(logdir)
        options = {k: dict(v) for k, v in (sink_options or {}).items()}
        planned = plan_sinks(sinks, archive, options, self.logdir)  # fail fast, build nothing
        self.is_main_process = _is_main_process() if is_main_process is None else is_main_process
        self._pid = os.getpid()  # a child made with os.fork() does not own the writer
        self.capturer = Capturer(model, tokenizer, probes, **capture_options)
        self.stats: Counter[str] = Counter()
        self._reported: set[str] = set()
        self._contained = _containment(self.stats, self._report_once, strict)
        self._logged_steps: set[int] = set()
        self._closed = False
        self._missing_said = 0  # lost steps that flush() has reported
        if check:  # before the sinks: a model without attention leaves nothing behind
            self.capturer.check(self.patterns)  # kept for a first `log` before any update
        self.sinks: list[Sink] = []  # the sinks in this process (on the thread writer)
        self._writer: ProcessWriter | ThreadWriter | SplitWriter | None = None
        self._unbuilt: Callable[[], None] | None = None  # the writer, built at the first event
        self._claimed = self.is_main_process and "archive" in planned
        if self.is_main_process:
            self._make_writer(planned, options, alerts, writer, queue_size, spill_mb)

    # -- configuration -----------------------------------------------------------------------

    def _make_writer(self, planned, options, alerts, kind, queue_size, spill_mb) -> None:
        """The main process's writer; a second training in the same archive is refused here.

        `writer="auto"` with the model on the CPU is decided at the first event: a model moved
        to its accelerator after the logger was built gets the writer process.
        """
        if self._claimed:
            claim(self.logdir)

        def build() -> None:
            self._unbuilt = None
            names = [item for item in planned if isinstance(item, str)]
            self._writer, self.sinks = build_writer(
                planned,
                self._writer_config(names, options, alerts),
                kind=choose_writer(kind, self.capturer.model),
                queue_size=queue_size,
                spill=lambda name: Spill(spill_root(self.logdir), int(spill_mb * 2**20), name),
                stats=self.stats,
                report=self._report_once,
            )

        if kind == "auto" and choose_writer(kind, self.capturer.model) == "thread":
            self._unbuilt = build
        else:
            build()
        # A run that crashes never reaches close(): still write what is queued at exit.
        atexit.register(_close_at_exit, weakref.ref(self))

    def _writer_config(self, names: list[str], options: dict, alerts: bool) -> WriterConfig:
        if "mlflow" in names:
            options["mlflow"] = {
                "cards": True,  # images drawn for MLflow's cards (MLflowSink)
                **active_mlflow_run(options.get("mlflow", {})),
                **options.get("mlflow", {}),
            }
        return WriterConfig(
            sinks=[(name, options.get(name, {})) for name in names],
            logdir=str(self.logdir.absolute()),
            patterns=self.patterns,
            views=self.views,
            layer_images=self.layer_images,
            alerts=alerts,
            settings=self._contained("settings", self.settings),
            strict=self.strict,
            sys_path=list(sys.path),
        )

    # -- the training process ------------------------------------------------------------------

    def log(self, step: int) -> bool:
        """Capture now and hand the event to the writer. True if it was handed over.

        Never raises for a logging failure (unless `strict`): it is reported once, counted in
        `stats`, and training goes on. A step that is not an integer ≥ 0 is a programming
        error in the caller and raises TypeError (ValueError if negative), on every call.
        """
        step = _check_step(step)
        if self._closed or self._forked():
            return False
        sharded = self.capturer.sharded
        if not self.is_main_process and not sharded:  # only rank 0 captures and writes
            return False
        if sharded:  # every rank must make the same choice for this step, or the next pass hangs
            self._logged_steps.add(step)
        started = time.perf_counter()
        measured = self._contained("capture", self._measure, step)
        self.stats["training_thread_ms"] += (time.perf_counter() - started) * 1000
        if self._unbuilt is not None and measured is not None:
            self._contained("writer", self._unbuilt)
        if measured is None or self._writer is None:  # other ranks only join the probe pass
            return False
        snapshot, table = measured
        if snapshot is None:  # not rank 0 of a sharded pass
            return False
        page = self.stats["events"] % self.views_every == 0
        self._writer.submit(Event(step, snapshot, table, page=page))
        self._logged_steps.add(step)
        self.stats["events"] += 1
        return True

    def _measure(self, step: int) -> tuple[Any, Any]:
        # Probes kept whole are copied to the host anyway (archive, views): the writer scores that
        # copy, so the training process pays only the forward and one copy, on any device. On an
        # H200, scoring 8 short probes on the device cost 4-7x the probe forward itself in kernel
        # launches. Pooled long probes are scored during the pass (their n x n never exists).
        return self.capturer.measure(step, self.patterns, scores=False)

    def resume_at(self, step: int) -> None:
        """A run resumed from a checkpoint at `step` replays the steps the interrupted run logged
        after it (same data, same weights): count them as logged, so no sink gets them twice."""
        from attnlog.layout import read_index

        steps = sorted(e["step"] for e in read_index(self.logdir) if e["step"] > step)
        if self.capturer.sharded:
            # Every rank must skip the same steps, or one enters a probe pass alone and waits;
            # only rank 0 writes the index, and other ranks may not share its file system.
            from attnlog.capturing import broadcast_from_rank_zero

            steps = broadcast_from_rank_zero(steps)
        self._logged_steps |= set(steps)

    @property
    def logged_steps(self) -> set[int]:
        return set(self._logged_steps)

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id, once it started (None with the thread writer)."""
        return getattr(self._writer, "pid", None)

    # -- errors ---------------------------------------------------------------------------------

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
        if self.views_every > 1:
            out["views_every"] = str(self.views_every)
        for probe in self.capturer.probe_set:
            text = probe.text if probe.pair is None else f"{probe.text} ||| {probe.pair}"
            out[f"probe.{probe.name}"] = describe(text)
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event handed over so far is written and the sinks are flushed.

        Args:
            timeout: seconds to wait at most (default: `close_timeout`).

        Returns:
            False when the time ran out first (said once, with the steps still waiting), or
            when events were lost since the last flush (said, with their steps).
        """
        if self._writer is None or self._closed or self._forked():
            return True
        timeout = self.close_timeout if timeout is None else timeout
        done = self._writer.flush(timeout)
        if not done:
            self._report_once(
                "flush",
                f"flush did not finish within {timeout:g} s (a sink hangs?); not written yet: "
                f"steps {self._writer.unwritten()}",
            )
        lost = self._say_lost()
        self._raise_failure()
        return done and not lost

    def _say_lost(self, said: bool = False) -> list[int]:
        """The steps lost since the last call, said in a warning unless `said` already."""
        missing = self._writer.missing[self._missing_said :]
        self._missing_said += len(missing)
        if missing and not said:
            self._report_once(
                f"lost {missing}",
                f"the events of steps {missing} were not written (see the warnings above for "
                "why; counted in stats['lost'])",
            )
        return missing

    def _forked(self) -> bool:
        """In a child made with os.fork(): the writer's threads did not follow, and the parent
        still writes; the child neither logs nor waits for the parent's events at exit."""
        return os.getpid() != self._pid

    def _raise_failure(self) -> None:
        """strict: the writer's first error, raised in the caller's thread."""
        failure = self._writer.take_failure() if self._writer is not None else None
        if failure is not None:
            raise failure

    def close(self, timeout: float | None = None) -> bool:
        """Write everything handed over, then close every sink. Safe to call twice.

        Args:
            timeout: give up after this many seconds without an event written (default:
                `close_timeout`); the writer is then stopped and the steps left unwritten are
                reported.

        Returns:
            False when it gave up, or when events were lost since the last flush.
        """
        if self._closed:
            return True
        self._closed = True
        if self._forked():  # the parent closes its writer
            return True
        if self._writer is None:  # another rank, or no event logged yet
            if self._claimed:
                release(self.logdir)
            return True
        done = self._writer.close(self.close_timeout if timeout is None else timeout)
        release(self.logdir)
        lost = self._say_lost(said=not done)  # a stalled close named them
        self._raise_failure()
        return done and not lost

    def __enter__(self) -> AttentionLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_interval(every: Any, name: str = "every_n_steps") -> int:
    """An interval (`every_n_steps`, `views_every`): a positive integer, or a clear error at
    construction."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{name} must be a positive integer, got {every!r}")
    return every


# ---- argument checks ------------------------------------------------------------------------


def _containment(stats: Counter[str], report: Any, strict: bool) -> Containment:
    """The training process's policy: under `strict`, errors are raised in the caller."""
    return Containment(stats, report, strict=strict, raise_strict=True)


def _check_writer_options(queue_size: Any, spill_mb: Any, writer: Any, close_timeout: Any) -> None:
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
    if not spill_mb > 0:
        raise ValueError(f"spill_mb must be a positive number of MiB, got {spill_mb!r}")
    if writer not in WRITERS:
        raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
    if not close_timeout > 0:
        raise ValueError(
            f"close_timeout must be a positive number of seconds, got {close_timeout!r}"
        )


def _check_step(step: Any) -> int:
    if not isinstance(step, bool):
        try:
            value = operator.index(step)  # int, numpy and 0-d torch integers
        except TypeError:
            pass
        else:
            if value < 0:
                raise ValueError(f"log(step) needs a training step >= 0, got {value}")
            return value
    raise TypeError(
        f"log(step) needs an integer training step, got {step!r} ({type(step).__name__})"
    )


def _check_views(views: Sequence[str] | str) -> tuple[str, ...]:
    from attnlog.layout import VIEWS

    views = (views,) if isinstance(views, str) else tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {list(VIEWS)}, or () for none")
    return views


def _check_patterns(patterns: Sequence[str] | str | None) -> list[str] | None:
    from attnlog import patterns as registry

    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    choices = ", ".join(sorted(registry.PATTERNS))
    if not patterns:
        raise ValueError(f"patterns=[] scores nothing; pass None for all, or some of: {choices}")
    unknown = sorted(set(patterns) - set(registry.PATTERNS))
    if unknown:
        raise ValueError(f"unknown patterns {unknown}; choose from {choices}")
    return patterns


def check_options(options: dict[str, Any], sinks: Any = ()) -> None:
    """Check, without a model, what AttentionLogger would check of these options: `views`,
    `patterns`, sink names, their packages and `sink_options`. The callbacks call it when they
    are built, long before `on_train_begin` builds the logger."""
    if "views" in options:
        _check_views(options["views"])
    if "patterns" in options:
        _check_patterns(options["patterns"])
    sink_options = options.get("sink_options") or {}
    plan_sinks([] if sinks is None else sinks, False, sink_options, logdir=None)


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
            log.warning("attnlog: closing at exit failed: %s", cause(ex))
