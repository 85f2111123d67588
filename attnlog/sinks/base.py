"""The one protocol every sink implements, the name -> class registry, and public names.

Every sink implements every method (a backend that cannot show something stores it as an
artifact or drops it with one warning), so the logger never asks what a sink can do.
Tag and metric names are built here, in one place, because users see them.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot


@runtime_checkable
class Sink(Protocol):
    """Where one logging event goes. Called from the logger's worker thread only.

    Images are uint8 arrays `[height, width, 3]`; HTML files are keyed by a relative path such as
    `attention/step_00000100/probe_0/head_view.html`; scalars and texts by their tag.
    """

    name: str

    def log_settings(self, settings: Mapping[str, str]) -> None: ...

    def log_scores(self, table: ScoreTable, step: int) -> None: ...

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None: ...

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None: ...

    def log_html(self, files: Mapping[str, str], step: int) -> None: ...

    def log_text(self, texts: Mapping[str, str], step: int) -> None: ...

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


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


# ---- public names ---------------------------------------------------------------------------

_SAFE = re.compile(r"[^0-9A-Za-z_\-./ ]")


def safe_name(text: str) -> str:
    """A probe or pattern name usable in TensorBoard tags, MLflow keys and file names."""
    cleaned = _SAFE.sub("_", text.strip()).replace(" ", "_").replace("/", "_")
    return cleaned or "probe"


def tb_attention_tag(probe: str, layer: int | None = None) -> str:
    """`attention/<probe>/layer_<l>` (one layer's heads) or `attention/<probe>/model`."""
    suffix = "model" if layer is None else f"layer_{layer}"
    return f"attention/{safe_name(probe)}/{suffix}"


def tb_pattern_tag(pattern: str, layer: int | str | None = None) -> str:
    """`patterns/<p>` (image), `patterns/<p>/layer_<l>` or `patterns/<p>/max` (scalars)."""
    if layer is None:
        return f"patterns/{pattern}"
    if isinstance(layer, str):
        return f"patterns/{pattern}/{layer}"
    return f"patterns/{pattern}/layer_{layer}"


def mlflow_metric(pattern: str, layer: int, head: int | None = None) -> str:
    """`attn.<p>.L<l>H<h>` per head, `attn.<p>.L<l>` for the layer mean."""
    return f"attn.{pattern}.L{layer}" + ("" if head is None else f"H{head}")


def html_path(step: int, probe: str, view: str) -> str:
    """`attention/step_<8 digits>/<probe>/<view>.html`."""
    return f"attention/step_{step:08d}/{safe_name(probe)}/{view}.html"


def scores_path(step: int) -> str:
    return f"attention/step_{step:08d}/scores.json"


def text_path(step: int, tag: str) -> str:
    """`attention/step_<8 digits>/text/<tag>.md`: texts stored as files (MLflow artifacts)."""
    return f"attention/step_{step:08d}/text/{safe_name(tag)}.md"


TB_SETTINGS_TAG = "attnlog/settings"  # text: the logger's settings, once, at the first step
TB_ALERTS_TAG = "attnlog/alerts"  # text: the alerts raised at this step


def plugin_dir(logdir: str | os.PathLike) -> Path:
    """`<logdir>/plugins/attnlog`: the folder the archive, HTML and the MLflow spool live in."""
    return Path(logdir) / "plugins" / "attnlog"


def archive_name(step: int) -> str:
    """`step_<8 digits>.npz`, the archive file of one step inside `plugin_dir(logdir)`."""
    return f"step_{step:08d}.npz"


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


def head_metrics(table: ScoreTable) -> dict[str, float]:
    """MLflow-style metrics: one per (pattern, layer, head) plus layer means, NaN left out."""
    import numpy as np

    out: dict[str, float] = {}
    for pattern, matrix in table.scores.items():
        for (layer, head), value in np.ndenumerate(matrix):
            if finite(float(value)):
                out[mlflow_metric(pattern, layer, head)] = float(value)
        for layer in range(matrix.shape[0]):
            row = matrix[layer][np.isfinite(matrix[layer])]
            if row.size:
                out[mlflow_metric(pattern, layer)] = float(row.mean())
    return out


def describe(value: Any) -> str:
    """Short text for settings/params."""
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
