"""Names and folder layout shared by the writers (sinks) and the readers (plugin, report, CLI).

Like TensorBoard's per-plugin `metadata.py`: the one place that says where things go, so a writer
and a reader cannot drift apart. Nothing here imports numpy, torch, mlflow or tensorboard.

Layout of a run folder (`logdir`)::

    <logdir>/events.out.tfevents.*          TensorBoard sink
    <logdir>/plugins/attnlog/               plugin_dir(logdir)
        index.jsonl                         one JSON line per archived step (INDEX)
        step_<8 digits>.npz                 archive_name(step)
        html/attention/step_<8>/<probe>/<view>.html   html_dir(logdir) / html_path(...)
        mlflow_spool/                       default_spool_dir(logdir)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHIVE_VIEWS",
    "INDEX",
    "TB_ALERTS_TAG",
    "TB_SETTINGS_TAG",
    "archive_name",
    "archive_path",
    "clean_key",
    "default_spool_dir",
    "html_dir",
    "html_path",
    "json_matrix",
    "mlflow_metric",
    "plugin_dir",
    "probe_shapes",
    "read_index",
    "safe_name",
    "scores_path",
    "tb_attention_tag",
    "tb_pattern_tag",
    "warn_once",
]

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
TB_SETTINGS_TAG = "attnlog/settings"  # text: the logger's settings, once, at the first step
TB_ALERTS_TAG = "attnlog/alerts"  # text: the alerts raised at this step

# The characters both TensorBoard tags, MLflow keys (log_batch and log_image) and file names take.
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-./ ]")


# ---- names ----------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A probe or pattern name usable as one tag part, MLflow key part and file name."""
    cleaned = _UNSAFE.sub("_", text.strip()).replace(" ", "_").replace("/", "_")
    return cleaned or "probe"


def clean_key(text: str, max_length: int | None = None) -> str:
    """A metric/param/tag/image key MLflow accepts: safe characters, no `.`/`..` path parts.

    `max_length` is MLflow's `MAX_ENTITY_KEY_LENGTH` (passed in: this module imports no mlflow).
    """
    parts = [p for p in _UNSAFE.sub("_", str(text)).split("/") if p.strip()]
    key = "/".join("_" if p in (".", "..") else p for p in parts) or "_"
    return key if max_length is None else key[:max_length]


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


# ---- relative paths (HTML files, MLflow artifacts) ------------------------------------------


def _step_dir(step: int) -> str:
    return f"attention/step_{step:08d}"


def html_path(step: int, probe: str, view: str) -> str:
    """`attention/step_<8 digits>/<probe>/<view>.html`."""
    return f"{_step_dir(step)}/{safe_name(probe)}/{view}.html"


def scores_path(step: int) -> str:
    """`attention/step_<8 digits>/scores.json` (an MLflow artifact)."""
    return f"{_step_dir(step)}/scores.json"


# ---- folders --------------------------------------------------------------------------------


def plugin_dir(logdir: str | os.PathLike) -> Path:
    """`<logdir>/plugins/attnlog`: the folder the archive, HTML and the MLflow spool live in."""
    return Path(logdir) / "plugins" / "attnlog"


def html_dir(logdir: str | os.PathLike) -> Path:
    """`<logdir>/plugins/attnlog/html`: root of the `html_path` files TensorBoard cannot show."""
    return plugin_dir(logdir) / "html"


def default_spool_dir(logdir: str | os.PathLike) -> Path:
    """Where a run's unsent MLflow events wait: `<logdir>/plugins/attnlog/mlflow_spool`."""
    return plugin_dir(logdir) / "mlflow_spool"


def archive_name(step: int) -> str:
    """`step_<8 digits>.npz`, the archive file of one step inside `plugin_dir(logdir)`."""
    return f"step_{step:08d}.npz"


def archive_path(logdir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """The `.npz` of one index entry; only its base name counts, so it cannot point elsewhere."""
    return plugin_dir(logdir) / Path(str(entry["file"])).name


# ---- what the index records per probe ----------------------------------------------------------

# The attention arrays of an archived probe that the Attention tab can show, `[L, H, rows, cols]`.
ARCHIVE_VIEWS = ("attention", "decoder_attention", "cross_attention")


def probe_shapes(probe: Any) -> dict[str, Any]:
    """`{name, pooled, shapes: {view: [L, H, rows, cols]}}` of a `ProbeAttention`.

    Stored in each index line (`probe_shapes`) so the Attention tab lists steps without opening
    their archives; `pooled` is true when the attention is by token block (`probe.labels`).
    """
    shapes = {
        view: [int(n) for n in getattr(probe, view).shape]
        for view in ARCHIVE_VIEWS
        if getattr(probe, view, None) is not None
    }
    return {
        "name": probe.name,
        "pooled": getattr(probe, "labels", None) is not None,
        "shapes": shapes,
    }


# ---- the index --------------------------------------------------------------------------------


def read_index(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The archived steps of a run, sorted by step; one entry per step (the last one wins).

    Damage never stops a reader: lines that are not UTF-8, not JSON, not an object, or lack an
    integer `step` and a `file` (a crash mid-write, a hand edit) are skipped with one warning
    per index. A missing or truncated `.npz` is the caller's to skip (see `attnlog.report`).
    Open a step with `attnlog.load(archive_path(logdir, entry))`.
    """
    path = plugin_dir(logdir) / INDEX
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        entry = _entry(raw)
        if entry is None:
            bad += 1
            continue
        by_step[entry["step"]] = entry
    if bad:
        warn_once(path, f"attnlog: skipped {bad} damaged line(s) of {path}")
    return [by_step[s] for s in sorted(by_step)]


def _entry(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    step = entry.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None
    return entry


_warned: set[str] = set()


def warn_once(key: Any, message: str) -> None:
    """Log `message` the first time `key` is seen in this process (readers poll often)."""
    key = str(key)
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ---- JSON -----------------------------------------------------------------------------------


def json_matrix(rows: Iterable[Iterable[float]], digits: int | None = None) -> list:
    """A 2-D score or attention matrix as nested lists for JSON: NaN/inf -> null, rounded."""
    out = []
    for row in rows:
        values = []
        for value in row:
            value = float(value)
            if not math.isfinite(value):
                values.append(None)
            else:
                values.append(value if digits is None else round(value, digits))
        out.append(values)
    return out
