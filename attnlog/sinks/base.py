"""The `Sink` base class every sink derives from, and the name -> class registry.

A sink implements only what it stores: every method does nothing by default (as accelerate's
`GeneralTracker` and Lightning's `Logger`), so the logger calls all seven on every sink and never
asks what a sink can do. Names and folders shared with the readers live in `attnlog.layout`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from attnlog.layout import mlflow_metric, tb_pattern_tag

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

__all__ = [
    "BUILTIN_SINKS",
    "OPTIONAL_SINK_METHODS",
    "SINK_METHODS",
    "SINKS",
    "Sink",
    "check_writable_dir",
    "head_metrics",
    "missing_methods",
    "pattern_scalars",
    "register_sink",
    "sink_factory",
]

# The calls the logger makes on every sink, in the order of one event.
SINK_METHODS = (
    "log_settings",
    "log_scores",
    "log_images",
    "log_html",
    "log_archive",
    "flush",
    "close",
)
# Calls a sink may leave out (not part of the structural check): `log_event(snapshot, table,
# step)` gets the whole event, for a sink that draws or summarises it its own way (MLflow's
# image cards and run summary); `resume_options()` names what a restarted writer goes on with.
OPTIONAL_SINK_METHODS = ("log_event", "resume_options")


@runtime_checkable
class Sink(Protocol):
    """Where one logging event goes. Subclass it and override what your backend stores.

    Called from one thread (or the writer process) at a time. Images are uint8 arrays
    `[height, width, 3]` keyed by tag (`layout.tb_attention_tag`); HTML files are keyed by a
    relative path (`layout.html_path`, e.g. `attention/step_00000100/probe_0/head_view.html`).

    A subclass inherits a no-op for every method it leaves out. A class that does not subclass
    `Sink` is one too when it has a `name` and all seven methods (`SINK_METHODS`) as class
    attributes: `Sink` is a runtime-checkable `Protocol`, so `isinstance(obj, Sink)` is a
    structural check: the logger refuses an object that fails it, and `missing_methods` names
    what the object lacks.
    """

    name: str = "sink"

    def log_settings(self, settings: Mapping[str, str]) -> None:
        """The logger's settings, once, before the first event."""

    def log_scores(self, table: ScoreTable, step: int) -> None:
        """Per-head pattern scores `[L, H]` and alerts of one event."""

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Heatmaps, uint8 `[height, width, 3]`, keyed by tag."""

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        """Self-contained bertviz views keyed by relative path."""

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        """The raw attention of one event (only the archive keeps it)."""

    def flush(self) -> None:
        """Make everything logged so far durable or sent."""

    def close(self) -> None:
        """Flush and release resources; safe to call twice."""


def missing_methods(obj: object) -> list[str]:
    """What `obj` lacks of a sink: the `SINK_METHODS` it has no callable for, then `name`."""
    missing = [m for m in SINK_METHODS if not callable(getattr(obj, m, None))]
    return missing + ([] if isinstance(getattr(obj, "name", None), str) else ["name"])


SINKS: dict[str, Callable[..., Sink]] = {}


def register_sink(name: str, factory: Callable[..., Sink]) -> None:
    """Make `name` usable in `sinks=[...]`. Shadowing a built-in name warns."""
    if not callable(factory):
        raise TypeError(f"register_sink({name!r}, ...) needs a class or factory, got {factory!r}")
    if name in SINKS:
        warnings.warn(f"attnlog: sink {name!r} is replaced by {factory!r}", stacklevel=2)
    SINKS[name] = factory


def _builtin(name: str) -> Callable[..., Sink]:
    # Imported lazily so that `import attnlog` never imports tensorboard or mlflow.
    if name == "tensorboard":
        from attnlog.sinks.tensorboard import TensorBoardSink

        return TensorBoardSink
    if name == "mlflow":
        from attnlog.sinks.mlflow import MLflowSink

        return MLflowSink
    if name == "archive":
        from attnlog.sinks.archive import ArchiveSink

        return ArchiveSink
    if name == "memory":
        from attnlog.sinks.memory import MemorySink

        return MemorySink
    raise KeyError(name)


BUILTIN_SINKS = ("tensorboard", "mlflow", "archive", "memory")


def sink_factory(name: str) -> Callable[..., Sink]:
    """The class or factory registered as `name`; a clear error naming the choices otherwise."""
    if name in SINKS:
        return SINKS[name]
    try:
        return _builtin(name)
    except KeyError:
        choices = ", ".join(sorted({*BUILTIN_SINKS, *SINKS}))
        raise ValueError(f"unknown sink {name!r}; choose from {choices} or pass a Sink") from None


def check_writable_dir(path: str | os.PathLike, what: str = "log folder") -> Path:
    """Fail fast, before training, when `path` cannot be created or written.

    Creates nothing: it checks the nearest existing ancestor, so a sink constructed and never
    used leaves no empty folders behind.

    Raises:
        PermissionError: the folder (or its nearest existing parent) is not writable.
        ValueError: a parent is a regular file, so the folder can never be created.
    """
    path = Path(path).expanduser().absolute()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    fix = f"pass a writable folder, or remove {ancestor} if it should be a folder"
    if not ancestor.is_dir():
        raise ValueError(f"attnlog: cannot create the {what} {path}: {ancestor} is a file; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"attnlog: cannot write the {what} {path}: {ancestor} is not writable; pass a "
            "writable folder or fix its permissions"
        )
    return path


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def pattern_scalars(table: ScoreTable) -> dict[str, float]:
    """TensorBoard-style scalars: per-layer mean over heads and the max, NaN left out."""
    import numpy as np

    out: dict[str, float] = {}
    for pattern, matrix in table.scores.items():  # [L, H]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers are skipped below
            layer_means = np.nanmean(matrix, axis=1)
        for layer, value in enumerate(layer_means):
            if finite(float(value)):
                out[tb_pattern_tag(pattern, layer)] = float(value)
        if np.isfinite(matrix).any():
            out[tb_pattern_tag(pattern, "max")] = float(np.nanmax(matrix))
    return out


def head_metrics(table: ScoreTable, heads: bool = True) -> dict[str, float]:
    """MLflow-style metrics: layer means, and with `heads` one per (pattern, layer, head);
    NaN left out."""
    import numpy as np

    out: dict[str, float] = {}
    for pattern, matrix in table.scores.items():
        for (layer, head), value in np.ndenumerate(matrix) if heads else ():
            if finite(float(value)):
                out[mlflow_metric(pattern, layer, head)] = float(value)
        for layer in range(matrix.shape[0]):
            row = matrix[layer][np.isfinite(matrix[layer])]
            if row.size:
                out[mlflow_metric(pattern, layer)] = float(row.mean())
    return out


def describe(value: object) -> str:
    """Short text for settings/params."""
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
