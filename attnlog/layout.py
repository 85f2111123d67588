"""Names and folder layout shared by the writers (sinks) and the readers (plugin, report, CLI).

Like TensorBoard's per-plugin `metadata.py`: the one place that says where things go, so a writer
and a reader cannot drift apart. Nothing here imports numpy, torch, mlflow or tensorboard.

Layout of a run folder (`logdir`)::

    <logdir>/events.out.tfevents.*          TensorBoard sink
    <logdir>/plugins/attnlog/               plugin_dir(logdir)
        index.jsonl                         one JSON line per archived step (INDEX)
        step_<8 digits>.npz                 archive_name(step)
        html/attention/step_<8>.html        html_dir(logdir) / page_path(step): the event's page
        html/attention/step_<8>/<probe>/<view>.html   html_path(...): per-probe pages (option)
        mlflow_spool/                       default_spool_dir(logdir)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlog.notes import warn_once

if TYPE_CHECKING:
    from attnlog.snapshot import ProbeAttention

from attnlog.files import read_regular

__all__ = [
    "ARCHIVE_VIEWS",
    "DEFAULT_VIEWS",
    "INDEX",
    "TB_ALERTS_TAG",
    "TB_SETTINGS_TAG",
    "PER_PROBE",
    "VIEWS",
    "archive_name",
    "archive_path",
    "ascii_key",
    "clean_key",
    "default_spool_dir",
    "html_dir",
    "html_path",
    "json_matrix",
    "mlflow_metric",
    "page_path",
    "plugin_dir",
    "probe_shapes",
    "read_index",
    "safe_name",
    "scores_path",
    "tb_attention_tag",
    "tb_pattern_tag",
]

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
TB_SETTINGS_TAG = "attnlog/settings"  # text: the logger's settings, once, at the first step
TB_ALERTS_TAG = "attnlog/alerts"  # text: the alerts raised at this step

# The ASCII characters MLflow keys take (`log_image` checks `[a-zA-Z0-9_\-./ ]`; metric names
# also take `:` on POSIX only). Non-ASCII characters are escaped (`ascii_key`), others become `_`.
_KEY_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./ ")


# The HTML views the logger may be asked for (the writer renders them). "*_words": the same
# view between words (Clark et al.'s aggregation, `attnlog.words`).
# PER_PROBE is not a view: it asks for one page per probe and view instead of the event page.
PER_PROBE = "per_probe"
VIEWS = ("head", "model", "neuron", "head_words", "model_words", PER_PROBE)
DEFAULT_VIEWS = ("head", "model", "neuron")


# ---- names ----------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A probe name usable as one TensorBoard tag part and one file name.

    Letters, marks and digits of any script stay (`猫` stays `猫`, in NFC form), as do `_`, `-`
    and `.`; anything else (spaces, `/`, punctuation, symbols) becomes `_`, and a leading `.` too
    (no hidden files, no `..`). MLflow keys take ASCII only: see `ascii_key`.
    """
    text = unicodedata.normalize("NFC", str(text).strip())
    cleaned = "".join(c if c in "_-." or unicodedata.category(c)[0] in "LMN" else "_" for c in text)
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    return cleaned or "probe"


def ascii_key(text: str) -> str:
    """`text` in ASCII, one to one: a non-ASCII character `c` becomes `-u<4 hex>` (`-U<8 hex>`
    beyond U+FFFF), so `猫` -> `-u732b` and `狗` -> `-u72d7`; a literal `-` before `u`/`U` becomes
    `-u002d` so that no escape can be forged. ASCII text without `-u`/`-U` is unchanged."""
    out = []
    for i, c in enumerate(text):
        if ord(c) > 0x7F or (c == "-" and text[i + 1 : i + 2] in ("u", "U")):
            out.append(f"-u{ord(c):04x}" if ord(c) <= 0xFFFF else f"-U{ord(c):08x}")
        else:
            out.append(c)
    return "".join(out)


def clean_key(text: str, max_length: int | None = None) -> str:
    """A metric/param/tag/image key MLflow accepts: ASCII (`ascii_key`), other characters it
    refuses as `_`, no empty or `.`/`..` path parts.

    Distinct `safe_name`s give distinct keys. A key over `max_length` (MLflow's
    `MAX_ENTITY_KEY_LENGTH`, passed in: this module imports no mlflow) is cut and ends in 8 hex
    digits of its hash, so long keys stay distinct too.
    """
    escaped = "".join(c if c in _KEY_SAFE else "_" for c in ascii_key(str(text)))
    parts = [p for p in escaped.split("/") if p.strip()]
    key = "/".join("_" if p in (".", "..") else p for p in parts) or "_"
    if max_length is None or len(key) <= max_length:
        return key
    digest = hashlib.sha1(key.encode("ascii")).hexdigest()[:8]
    return f"{key[: max_length - 9]}-{digest}"


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


def page_path(step: int) -> str:
    """`attention/step_<8 digits>.html`: the one page of an event's views (an MLflow artifact)."""
    return f"{_step_dir(step)}.html"


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


def probe_shapes(probe: ProbeAttention) -> dict[str, Any]:
    """`{name, pooled, shapes: {view: [L, H, rows, cols]}}` of a `ProbeAttention`.

    Stored in each index line (`probe_shapes`) so the Attention tab lists steps without opening
    their archives; `pooled` is true when the attention is by token block (`probe.labels`).
    """
    shapes = {
        view: [int(n) for n in getattr(probe, view).shape]
        for view in ARCHIVE_VIEWS
        if getattr(probe, view) is not None
    }
    return {
        "name": probe.name,
        "pooled": probe.labels is not None,
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
        data = read_regular(path)  # a FIFO named index.jsonl must not hang the reader
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
        warn_once(path, f"attnlog: skipped {bad} damaged line(s) of {path}", logger=log)
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


# ---- JSON -----------------------------------------------------------------------------------


def json_matrix(rows: Iterable[Iterable[float]], digits: int | None = None) -> list:
    """A 2-D score or attention matrix as nested lists for JSON: NaN/inf -> null, rounded.

    In numpy, not value by value: `scores.json` holds about 12,000 numbers an event (10 ms of
    the writer's CPU that way).
    """
    import numpy as np

    matrix = np.asarray(rows, dtype=np.float64)  # float32 widens exactly
    finite = np.isfinite(matrix)
    if digits is not None:
        matrix = np.round(matrix, digits)
    out = matrix.tolist()
    if not finite.all():
        for row, column in zip(*np.nonzero(~finite)):
            out[row][column] = None
    return out
