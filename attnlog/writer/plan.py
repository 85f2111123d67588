"""Where each sink runs: the sinks a logger is asked for, checked without building any, and the
writer (process, thread, or both) that gets them.

Named sinks are rebuilt in the writer process from their name and options; `Sink` objects cannot
be, so they run on a thread of the training process with the rendering for them.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import pickle
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnlog.notes import warn_once
from attnlog.sinks.base import Sink, check_writable_dir, sink_factory
from attnlog.writer.contain import cause
from attnlog.writer.events import EventWriter, WriterConfig
from attnlog.writer.outbox import Report, ThreadWriter
from attnlog.writer.process import ProcessWriter
from attnlog.writer.spill import Spill
from attnlog.writer.split import SplitWriter

__all__ = [
    "DEFAULT_SINKS",
    "active_mlflow_run",
    "build_writer",
    "choose_writer",
    "default_sinks",
    "note_once",
    "plan_sinks",
]

log = logging.getLogger("attnlog")

DEFAULT_SINKS = ("tensorboard", "mlflow")  # those installed; see `default_sinks`
_BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # sink name -> package it needs


def build_writer(
    planned: list[str | Sink],
    config: WriterConfig,
    *,
    kind: str,
    queue_size: int,
    spill: Callable[[str], Spill],
    stats: Counter[str],
    report: Report,
) -> tuple[ProcessWriter | ThreadWriter | SplitWriter, list[Sink]]:
    """The writer for `planned` sinks, and the sinks it runs in this process.

    Named sinks go to the writer process; Sink objects to a thread here (rendering for them
    too). `kind="thread"`, or names that cannot be sent, put every sink on the thread.
    """
    names = [item for item in planned if isinstance(item, str)]
    objects = [item for item in planned if not isinstance(item, str)]
    why = None
    if kind == "process" and names:
        try:
            config.factories = factories_for_process(config)
        except ValueError as ex:
            why = str(ex)
    if kind == "process" and names and why is None:
        process = ProcessWriter(config, queue_size, spill("process"), stats, report)
        if not objects:
            return process, []
        where = "the named sinks run in the writer process"
        _note_thread(f"the sink {type(objects[0]).__name__} is an object", where)
        thread = _thread_writer(objects, config, queue_size, spill, stats, report)
        return SplitWriter(process, thread), objects
    if kind == "process" and (why or objects):
        why = why or f"the sink {type(objects[0]).__name__} is an object"
        _note_thread(why, "so do the other sinks and all rendering")
    options = dict(config.sinks)
    for name in names:
        objects.append(sink_factory(name)(**{"logdir": config.logdir, **options[name]}))
    return _thread_writer(objects, config, queue_size, spill, stats, report), objects


def choose_writer(kind: str, model: Any) -> str:
    """What `writer="auto"` means for `model` now: the thread writer when it trains on the CPU
    with torch's threads on every core this process may use, else the writer process.

    A writer process pays off where it has a core to itself: beside an accelerator, where the
    training process is mostly one Python thread launching kernels that the writer's GIL would
    slow (about 60 % on an H200 with the thread writer), or beside CPU training that leaves cores
    free. When torch already fills every core, the process's start-up (torch, MLflow and its
    database store: about 3 s of CPU) and its rendering come out of training either way; the
    thread renders the same without the start-up or a second copy of the libraries (Trainer
    check, 2 cores: 0.82 training steps per event against 2.75; 130 MiB against 570).
    """
    if kind != "auto":
        return kind
    device = _device_of(model)
    if device is None or device.type != "cpu":
        return "process"
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "thread" if torch.get_num_threads() >= (cores or 1) else "process"


def _device_of(model: Any) -> Any:
    """The device of the model's first parameter or buffer, or None (none, or not torch)."""
    for tensors in ("parameters", "buffers"):
        try:
            return next(iter(getattr(model, tensors)())).device
        except (AttributeError, StopIteration, TypeError):
            continue
    return None


def _thread_writer(sinks, config, queue_size, spill, stats, report) -> ThreadWriter:
    event_writer = EventWriter(sinks, config, report=report, stats=stats)
    return ThreadWriter(event_writer, queue_size, spill("thread"), stats, report)


def _note_thread(why: str, others: str) -> None:
    note_once(
        f"attnlog: {why}, so it runs on a thread of the training process, where its "
        f"rendering and writing compete with training for the GIL (slow on a GPU); {others}. "
        "To run a custom sink in the writer process, register it with "
        "`attnlog.register_sink(name, factory)` in an importable module and pass its name",
        warn=True,
    )


def plan_sinks(sinks: Any, archive: bool, options: dict, logdir: Path | None) -> list[str | Sink]:
    """The sinks to use, checked without building any: names (known, installed, options that
    their factory takes) and Sink objects. The folder is checked when a named sink writes it."""
    if sinks is None:
        sinks = default_sinks()
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


def default_sinks() -> list[str]:
    """TensorBoard and MLflow, those whose packages are installed (found, not imported)."""
    found = [name for name in DEFAULT_SINKS if importlib.util.find_spec(_BACKENDS[name])]
    missing = [name for name in DEFAULT_SINKS if name not in found]
    text = f"attnlog: logging to {', '.join([*found, 'the archive'])}"
    if missing:
        hints = ", ".join(f"`pip install 'attnlog[{m}]'`" for m in missing)
        text += f" ({', '.join(missing)} not installed: {hints} to add it, or pass sinks=[...])"
    note_once(text, warn=bool(missing))
    return found


def factories_for_process(config: WriterConfig) -> bytes:
    """The user-registered factories of `config`'s sinks, pickled for the writer process.

    Raises:
        ValueError: saying why the sinks cannot be rebuilt in another process.
    """
    from attnlog.sinks.base import SINKS

    factories = {name: SINKS[name] for name, _ in config.sinks if name in SINKS}
    for name, factory in factories.items():
        if getattr(factory, "__module__", "__main__") == "__main__":
            raise ValueError(f"the sink {name!r} is registered from the script's __main__")
    try:
        pickled = pickle.dumps(factories, protocol=5) if factories else b""
        pickle.dumps(config, protocol=5)
    except Exception as ex:
        why = f"the sink options cannot be sent to another process ({cause(ex)})"
        raise ValueError(why) from ex
    return pickled


def active_mlflow_run(options: dict) -> dict[str, str]:
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


def note_once(text: str, warn: bool = False) -> None:
    """Say `text` once per process: logged at INFO, and also a UserWarning when `warn`."""
    category = UserWarning if warn else None
    warn_once(text, text, category=category, logger=log, level=logging.INFO, stacklevel=4)
