"""AttentionLogger: the training process's side of logging — measure, then hand off.

`log(step)` runs the probe pass (scores on the device when there is one) and hands a host copy
to the writer (attnlog/writer.py), which renders and writes to every sink in another process
(default) or on a thread. After construction `log()` never raises for a logging failure:
failures are contained, reported once with their cause, and counted in `stats` (`strict=True`
raises them at `flush`/`close` instead, for tests). Configuration errors fail fast in
`__init__`, and a wrong argument to `log()` itself raises TypeError, like any mistyped call.
"""

from __future__ import annotations

import atexit
import importlib.util
import inspect
import logging
import operator
import os
import pickle
import sys
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from attnlog.capturing import Capturer, unwrap_model
from attnlog.settings import check_environment
from attnlog.sinks.base import Sink, check_writable_dir, describe, sink_factory
from attnlog.writer import Event, EventWriter, ProcessWriter, ThreadWriter, WriterConfig, cause

__all__ = ["AttentionLogger", "check_interval", "check_options"]

log = logging.getLogger("attnlog")

WRITERS = ("process", "thread")
DEFAULT_SINKS = ("tensorboard", "mlflow")  # those installed; see `_default_sinks`
_BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # sink name -> package it needs
_noted: set[str] = set()  # one-time notes, per process


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
        views: bertviz views written per probe and event: "head", "model", "neuron" (one name
            or several; `()` for none).
        layer_images: also log one token-labelled heatmap per layer and probe. Off by default:
            they are most of the writer's cost (benchmarks/README.md); the model image (all
            layers × heads) is always made, and the TensorBoard Attention tab shows any head
            token-labelled from the archive.
        sink_options: extra keyword arguments per sink name, e.g.
            `{"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}`.
        queue_size: events waiting for the writer; when full, the oldest waiting event is
            dropped (counted in `stats["dropped"]` and reported once), so training never waits.
        writer: where events are rendered and written.
            "process" (default): a writer process (`python -m attnlog.writer`, started at the
            first event). Rendering and the tracking clients hold Python's GIL for about a
            second per event; in a process of their own they cannot slow the training loop,
            which on a GPU is mostly Python launching kernels. Choose it for GPU training and
            whenever the sinks are names. A writer that dies is restarted and its events resent.
            "thread": a thread of the training process. Nothing extra to start (about 0.3 s
            and 150–300 MB of memory for the process), but each event's second of rendering
            competes with training for the GIL and the cores: on an H200 that slowed training
            by about 60 % at one event every 50 steps. Choose it for short CPU runs, notebooks
            that cannot start processes, or sinks that must live in the training process.
            Sink objects (not names), and sink options that cannot be pickled (a
            `SummaryWriter`), always run on the thread, with a one-time note; to move a custom
            sink into the writer process, `register_sink("name", MySink)` in an importable
            module and pass "name".
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
        stats: counters: `events`, `dropped`, `lost`, `writer_restarts`, `errors.<where>`,
            `training_thread_ms` (the training process's share) and `writer_cpu_ms`.
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
        layer_images: bool = False,
        archive: bool = True,
        sink_options: dict[str, dict[str, Any]] | None = None,
        alerts: bool = True,
        queue_size: int = 4,
        writer: str = "process",
        close_timeout: float = 60.0,
        is_main_process: bool | None = None,
        strict: bool = False,
        check: bool = True,
        **capture_options: Any,
    ) -> None:
        check_environment()
        self.views = _check_views(views)
        self.patterns = _check_patterns(patterns)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
        if not close_timeout > 0:
            raise ValueError(
                f"close_timeout must be a positive number of seconds, got {close_timeout!r}"
            )
        self.layer_images = layer_images
        self.strict = strict
        self.close_timeout = float(close_timeout)
        self.logdir = Path(logdir)
        options = {k: dict(v) for k, v in (sink_options or {}).items()}
        planned = _plan_sinks(sinks, archive, options, self.logdir)  # fail fast, build nothing
        self.is_main_process = _is_main_process() if is_main_process is None else is_main_process
        self.capturer = Capturer(model, tokenizer, probes, **capture_options)
        self.stats: Counter[str] = Counter()
        self._reported: set[str] = set()
        self._logged_steps: set[int] = set()
        self._closed = False
        if check:  # before the sinks: a model without attention leaves nothing behind
            self.capturer.check()
        self.sinks: list[Sink] = []  # the sinks in this process (thread writer only)
        self._writer: ProcessWriter | ThreadWriter | None = None
        if self.is_main_process:
            self._writer = self._make_writer(planned, options, writer, queue_size, alerts)
            # A run that crashes never reaches close(): still write what is queued at exit.
            atexit.register(_close_at_exit, weakref.ref(self))

    # -- configuration -----------------------------------------------------------------------

    def _make_writer(self, planned, options, writer, queue_size, alerts):
        names = [item for item in planned if isinstance(item, str)]
        if "mlflow" in names:
            options["mlflow"] = {
                **_active_mlflow_run(options.get("mlflow", {})),
                **options.get("mlflow", {}),
            }
        config = WriterConfig(
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
        if writer == "process":
            why = _why_not_a_process(planned, config)
            if why is None:
                return ProcessWriter(config, queue_size, self.stats, self._report_once)
            _note_once(
                f"attnlog: {why}, so rendering and writing run on a thread of the training "
                "process, where they compete with training for the GIL (slow on a GPU). To "
                "run a custom sink in the writer process, register it with "
                "`attnlog.register_sink(name, factory)` in an importable module and pass its name",
                warn=True,
            )
        for item in planned:
            if isinstance(item, str):
                self.sinks.append(
                    sink_factory(item)(**{"logdir": self.logdir, **options.get(item, {})})
                )
            else:
                self.sinks.append(item)
        event_writer = EventWriter(self.sinks, config, report=self._report_once, stats=self.stats)
        return ThreadWriter(event_writer, queue_size, self.stats, self._report_once)

    # -- the training process ------------------------------------------------------------------

    def log(self, step: int) -> bool:
        """Capture now and hand the event to the writer. True if it was handed over.

        Never raises for a logging failure (unless `strict`): it is reported once, counted in
        `stats`, and training goes on. A step that is not an integer ≥ 0 is a programming
        error in the caller and raises TypeError (ValueError if negative), on every call.
        """
        step = _check_step(step)
        if self._closed:
            return False
        sharded = getattr(self.capturer, "sharded", False)
        if not self.is_main_process and not sharded:  # only rank 0 captures and writes
            return False
        if sharded:  # every rank must make the same choice for this step, or the next pass hangs
            self._logged_steps.add(step)
        started = time.perf_counter()
        measured = self._contained("capture", self._measure, step)
        self.stats["training_thread_ms"] += (time.perf_counter() - started) * 1000
        if measured is None or self._writer is None:  # other ranks only join the probe pass
            return False
        snapshot, table = measured
        if snapshot is None:  # not rank 0 of a sharded pass
            return False
        dropped = self._writer.submit(Event(step, snapshot, table))
        if dropped is not None:
            self.stats["dropped"] += 1
            self._report_once(
                "dropped",
                f"the writer fell behind; dropped the event of step {dropped.step} "
                "(log less often, or with fewer views, to keep every event)",
            )
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
        if getattr(self.capturer, "sharded", False):
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

    def _contained(self, what: str, fn, *args, **kwargs):
        """Run fn; on error count it in `stats["errors.<what>"]` and report the first per `what`."""
        try:
            return fn(*args, **kwargs)
        except Exception as ex:
            if self.strict:
                raise
            self.stats[f"errors.{what}"] += 1
            self._report_once(what, f"{what} failed: {cause(ex)}")
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
        """Wait until every event handed over so far is written and the sinks are flushed.

        Args:
            timeout: seconds to wait at most (default: `close_timeout`).

        Returns:
            False when the time ran out first (said once, with the steps still waiting).
        """
        if self._writer is None or self._closed:
            return True
        timeout = self.close_timeout if timeout is None else timeout
        done = self._writer.flush(timeout)
        if not done:
            self._report_once(
                "flush",
                f"flush did not finish within {timeout:g} s (a sink hangs?); not written yet: "
                f"steps {self._writer.unwritten()}",
            )
        self._raise_failure()
        return done

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
            False when it gave up.
        """
        if self._closed:
            return True
        self._closed = True
        if self._writer is None:
            return True
        done = self._writer.close(self.close_timeout if timeout is None else timeout)
        self._raise_failure()
        return done

    def __enter__(self) -> AttentionLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_interval(every_n_steps: Any) -> int:
    """The adapters' logging interval: a positive integer, or a clear error at construction."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
    return every_n_steps


# ---- argument checks ------------------------------------------------------------------------


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
    from attnlog.render.event import VIEWS

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
    _plan_sinks([] if sinks is None else sinks, False, sink_options, logdir=None)


def _plan_sinks(sinks: Any, archive: bool, options: dict, logdir: Path | None) -> list[str | Sink]:
    """The sinks to use, checked without building any: names (known, installed, options that
    their factory takes) and Sink objects. The folder is checked when a named sink writes it."""
    if sinks is None:
        sinks = _default_sinks()
    elif isinstance(sinks, (str, Sink)):
        sinks = [sinks]
    planned = list(sinks)
    named = {i if isinstance(i, str) else getattr(i, "name", None) for i in planned}
    if archive and "archive" not in named:
        planned.append("archive")
    for item in planned:
        if not isinstance(item, str):
            if not isinstance(item, Sink):
                raise TypeError(f"{item!r} is not a sink name or a Sink (see attnlog.sinks.Sink)")
            continue
        factory = sink_factory(item)  # unknown name: ValueError listing the choices
        package = _BACKENDS.get(item)
        if package and importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"attnlog's {item} sink needs the `{package}` package; install it with "
                f"`pip install 'attnlog[{item}]'`"
            )
        _check_options(item, factory, options.get(item, {}))
    for name in options:  # a misspelt key would be ignored silently
        sink_factory(name)
    if logdir is not None and any(isinstance(item, str) and item != "memory" for item in planned):
        check_writable_dir(logdir)
    return planned


def _check_options(name: str, factory: Any, options: dict) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # not introspectable: the factory will say
        return
    try:
        signature.bind(**{"logdir": None, **options})
    except TypeError as ex:
        raise TypeError(f"sink_options[{name!r}] does not fit {factory!r}: {ex}") from None


def _default_sinks() -> list[str]:
    """TensorBoard and MLflow, those whose packages are installed (found, not imported)."""
    found = [name for name in DEFAULT_SINKS if importlib.util.find_spec(_BACKENDS[name])]
    missing = [name for name in DEFAULT_SINKS if name not in found]
    text = f"attnlog: logging to {', '.join([*found, 'the archive'])}"
    if missing:
        hints = ", ".join(f"`pip install 'attnlog[{m}]'`" for m in missing)
        text += f" ({', '.join(missing)} not installed: {hints} to add it, or pass sinks=[...])"
    _note_once(text, warn=bool(missing))
    return found


def _why_not_a_process(planned: list, config: WriterConfig) -> str | None:
    """Why the writer cannot run in another process, or None: everything pickles by name."""
    from attnlog.sinks.base import SINKS

    objects = [item for item in planned if not isinstance(item, str)]
    if objects:
        return f"the sink {type(objects[0]).__name__} is an object, not a name"
    factories = {name: SINKS[name] for name, _ in config.sinks if name in SINKS}
    for name, factory in factories.items():
        if getattr(factory, "__module__", "__main__") == "__main__":
            return f"the sink {name!r} is registered from the script's __main__"
    try:
        config.factories = pickle.dumps(factories, protocol=5) if factories else b""
        pickle.dumps(config, protocol=5)
    except Exception as ex:
        return f"the sink options cannot be sent to another process ({cause(ex)})"
    return None


def _active_mlflow_run(options: dict) -> dict[str, str]:
    """The training process's MLflow run and tracking URI, for the writer process to join.

    Only when mlflow is already imported (never imported here) and has an active run in this
    thread; a `tracking_uri` option that points elsewhere is left alone.
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or "run_id" in options:
        return {}
    uri = str(mlflow.get_tracking_uri())
    if options.get("tracking_uri") not in (None, uri):
        return {}
    out = {"tracking_uri": uri}
    active = mlflow.active_run()
    if active is not None:
        out["run_id"] = active.info.run_id
    return out


def _note_once(text: str, warn: bool = False) -> None:
    if text in _noted:
        return
    _noted.add(text)
    log.info(text)
    if warn:
        warnings.warn(text, UserWarning, stacklevel=4)


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
