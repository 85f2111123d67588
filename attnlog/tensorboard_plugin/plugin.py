"""TensorBoard's "Attention" tab: browse the archived attention of every logged step.

The archive (`<run>/plugins/attnlog/index.jsonl` + one `.npz` per step, see `attnlog.layout`) is
not an event file, so this plugin reads it from the log folder directly instead of through the
data provider, with the archive's own readers (`attnlog.load`, `load_scores`). Every route answers
small JSON (one head's matrix at a time); the page is an ES module that TensorBoard loads into an
iframe (see `FrontendMetadata.es_module_path`). `/attention?words=1` serves a probe's word view
(`attnlog.words.word_probe`: Clark et al.'s word-to-word attention, jieba for Chinese when it is
installed), computed from the archive once per step and probe.

As in TensorBoard's `text_plugin.py`, each route is a plain `*_impl` function (arguments in,
JSON-able dict out, `RequestError` for a client mistake) behind a thin werkzeug wrapper that
only parses the query. A damaged run never breaks the tab: a step whose file is missing or
cannot be read is left out (warned once) and the rest is served.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from attnlog.layout import (
    INDEX,
    archive_path,
    json_matrix,
    plugin_dir,
    probe_shapes,
    read_index,
    warn_once,
)
from attnlog.report import load
from attnlog.snapshot import ProbeAttention, Snapshot, load_scores
from attnlog.words import word_probe

__all__ = [
    "PLUGIN_NAME",
    "AttentionPlugin",
    "RequestError",
    "attention_impl",
    "runs_impl",
    "scores_impl",
    "trend_impl",
]

logger = logging.getLogger(__name__)

PLUGIN_NAME = "attnlog"
STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"/index.js": "text/javascript", "/style.css": "text/css"}
# view -> (row tokens, column tokens) of its [L, H, rows, cols] matrix
VIEWS = {  # keys: layout.ARCHIVE_VIEWS
    "attention": ("tokens", "tokens"),
    "decoder_attention": ("decoder_tokens", "decoder_tokens"),
    "cross_attention": ("decoder_tokens", "tokens"),
}
MAX_RUN_NAME = 1024  # longer `run` values are refused before touching the file system
ACTIVE_RECHECK_S = 30.0  # how often `is_active` may walk the logdir again while it finds nothing


class RequestError(Exception):
    """A client mistake, answered as `{"error": message}` with `code` (never a traceback)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---- the routes as plain functions ----------------------------------------------------------


def runs_impl(logdir: Path | None) -> dict[str, list[dict[str, Any]]]:
    """run -> [{step, patterns, probes: [{name, pooled, shapes: {view: [L, H, rows, cols]}}]}].

    From the index alone where it records the shapes (archives from this version on); steps
    whose archive file is missing or known to be unreadable are left out.
    """
    out = {}
    for run, folder in iter_runs(logdir):
        steps = []
        for entry in read_index(folder):
            probes = entry.get("probe_shapes")
            if not _stat(folder, entry):
                continue
            if not isinstance(probes, list):  # an older index: read the archive once
                snapshot = _snapshot(folder, entry)
                if snapshot is None:
                    continue
                probes = [probe_shapes(p) for p in snapshot.probes]
            steps.append(
                {"step": entry["step"], "patterns": entry.get("patterns", []), "probes": probes}
            )
        out[run] = steps
    return out


def scores_impl(logdir: Path | None, run: str, step: int) -> dict[str, Any]:
    """Every pattern's [layer][head] score matrix at one step (null where undefined)."""
    folder = run_folder(logdir, run)
    entry = _entry(folder, step)
    scores = _scores_of(folder, entry)
    if scores is None:
        raise RequestError(404, f"the archive file of step {step} is missing or damaged")
    return {
        "run": run,
        "step": entry["step"],
        "scores": {name: json_matrix(m) for name, m in sorted(scores.items())},
    }


def attention_impl(
    logdir: Path | None,
    run: str,
    step: int,
    probe: str,
    view: str,
    layer: int,
    head: int,
    words: bool = False,
) -> dict[str, Any]:
    """One head of one probe at one step: row/column tokens and the matrix (4 decimals).

    A pooled probe (longer than the capture's full-attention limit) is served by token block:
    its row and column labels are the blocks' texts. `words`: attention between words instead
    of tokens (self-attention of unpooled probes only); the labels are the words.
    """
    if view not in VIEWS:
        raise RequestError(400, f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if words and view != "attention":
        raise RequestError(400, f"the word view is of self-attention only, not {view}")
    folder = run_folder(logdir, run)
    entry = _entry(folder, step)
    snapshot = _snapshot(folder, entry)
    if snapshot is None:
        raise RequestError(404, f"the archive file of step {step} is missing or damaged")
    found = next((p for p in snapshot.probes if p.name == probe), None)
    if found is None:
        names = ", ".join(p.name for p in snapshot.probes)
        raise RequestError(404, f"step {entry['step']} has no probe {probe!r} (it has {names})")
    if words:
        found = _word_view(folder, entry, found)
    weights = getattr(found, view)
    if weights is None:
        raise RequestError(404, f"probe {probe!r} has no {view} (not an encoder-decoder)")
    _in_range("layer", layer, weights.shape[0], "layers")
    _in_range("head", head, weights.shape[1], "heads")
    rows, cols = (getattr(found, name) for name in VIEWS[view])
    pooled = view == "attention" and getattr(found, "labels", None) is not None
    if pooled:
        rows = cols = list(found.labels)
    return {
        "run": run,
        "step": entry["step"],
        "probe": probe,
        "view": view,
        "layer": layer,
        "head": head,
        "pooled": pooled,
        "words": words,
        "query_tokens": rows,
        "tokens": cols,
        "matrix": json_matrix(weights[layer, head], digits=4),
    }


def trend_impl(logdir: Path | None, run: str, pattern: str, layer: int, head: int) -> dict:
    """One head's score for one pattern at every readable step (null where not scored)."""
    folder = run_folder(logdir, run)
    steps, values, shape = [], [], None
    for entry in read_index(folder):
        scores = _scores_of(folder, entry)
        if scores is None:
            continue  # missing or damaged: leave the step out
        matrix = scores.get(pattern)
        value = None
        if matrix is not None:
            shape = matrix.shape
            if layer < matrix.shape[0] and head < matrix.shape[1]:
                value = float(matrix[layer, head])
        steps.append(entry["step"])
        values.append(value)
    if shape is None:
        raise RequestError(404, f"run {run!r} has no scores for pattern {pattern!r}")
    _in_range("layer", layer, shape[0], "layers")
    _in_range("head", head, shape[1], "heads")
    return {
        "run": run,
        "pattern": pattern,
        "layer": layer,
        "head": head,
        "steps": steps,
        "values": json_matrix([values])[0],
    }


# ---- runs and steps -------------------------------------------------------------------------


def iter_runs(logdir: Path | None) -> Iterator[tuple[str, Path]]:
    """(name, folder) of every folder holding an archive index, in a stable order."""
    if logdir is None or not logdir.is_dir():
        return
    for folder, subdirs, _ in os.walk(logdir):
        path = Path(folder)
        if (plugin_dir(path) / INDEX).is_file():
            yield path.relative_to(logdir).as_posix(), path
        subdirs[:] = sorted(d for d in subdirs if d != "plugins")  # plugin data, not runs


def run_folder(logdir: Path | None, run: str) -> Path:
    """The folder of `run` (a name listed by /runs) inside the logdir, or a 400/404."""
    if (
        len(run) > MAX_RUN_NAME
        or ".." in re.split(r"[\\/]", run)
        or os.path.isabs(run)
        or "\0" in run
    ):
        raise RequestError(400, f"run must be a run name listed by /runs, got {run[:80]!r}")
    if logdir is None:
        raise RequestError(404, "TensorBoard was started without a --logdir")
    folder = logdir / run
    try:
        inside = folder.resolve().is_relative_to(logdir.resolve())
        found = inside and (plugin_dir(folder) / INDEX).is_file()
    except (OSError, ValueError):  # a name too long for the file system, say
        found = False
    if not found:
        raise RequestError(404, f"no attnlog archive for run {run[:80]!r}")
    return folder


def _entry(folder: Path, step: int) -> dict[str, Any]:
    entry = next((e for e in read_index(folder) if e["step"] == step), None)
    if entry is None:
        raise RequestError(404, f"step {step} was not logged in this run")
    return entry


_BAD: set[tuple[str, int]] = set()  # (path, mtime) of archive files that failed to load


def _stat(folder: Path, entry: dict[str, Any]) -> tuple[str, int] | None:
    """(path, mtime) of the step's archive file; None (warned once) when missing or bad."""
    path = archive_path(folder, entry)
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        warn_once(path, f"attnlog: step {entry['step']}: {path} is missing; skipped")
        return None
    return None if key in _BAD else key


def _read(folder: Path, entry: dict[str, Any], reader: Callable) -> Any:
    """`reader(path, mtime)`, or None (warned once, remembered) when the file cannot be read."""
    key = _stat(folder, entry)
    if key is None:
        return None
    try:
        return reader(*key)
    except Exception as exc:  # truncated, not an archive, a newer format
        _BAD.add(key)
        warn_once(key, f"attnlog: step {entry['step']}: cannot read {key[0]}; skipped: {exc}")
        return None


def _snapshot(folder: Path, entry: dict[str, Any]) -> Snapshot | None:
    return _read(folder, entry, _load)


def _scores_of(folder: Path, entry: dict[str, Any]) -> dict[str, np.ndarray] | None:
    return _read(folder, entry, _scores)


@functools.lru_cache(maxsize=8)  # whole steps can be large: keep only a few
def _load(path: str, mtime_ns: int) -> Snapshot:
    """(path, mtime) keyed: a step rewritten by a resumed run is read again, not served stale."""
    return load(path)


@functools.lru_cache(maxsize=4096)
def _scores(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    """Only the `[L, H]` scores: the trend over many steps never decompresses attention."""
    return load_scores(path)


def _word_view(folder: Path, entry: dict[str, Any], probe: ProbeAttention) -> ProbeAttention:
    """The probe's word view, or a 404 for a pooled probe or one whose words cannot be told."""
    if getattr(probe, "labels", None) is not None:
        raise RequestError(
            404, f"probe {probe.name!r} is stored by token block (a long probe): no word view"
        )
    key = _stat(folder, entry)
    if key is None:
        raise RequestError(404, f"the archive file of step {entry['step']} is missing or damaged")
    try:
        return _words(*key, probe.name)
    except ValueError as exc:  # word ids that do not fit the tokens
        raise RequestError(404, f"probe {probe.name!r} has no word view: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _words(path: str, mtime_ns: int, name: str) -> ProbeAttention:
    """(path, mtime, probe) keyed like `_load`: each step's word view is aggregated once."""
    return word_probe(next(p for p in _load(path, mtime_ns).probes if p.name == name))


def _in_range(name: str, value: int, limit: int, what: str) -> None:
    if value >= limit:
        raise RequestError(400, f"{name} {value} is out of range: there are {limit} {what}")


# ---- the plugin: thin werkzeug wrappers -----------------------------------------------------


class AttentionPlugin(base_plugin.TBPlugin):
    """The "Attention" tab. Runs are the folders under the logdir (itself included, as ".")
    that hold an attnlog archive."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = Path(context.logdir).expanduser() if context.logdir else None
        self._active = False
        self._checked_at: float | None = None

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Attention")

    def is_active(self) -> bool:
        """Whether any run has an archive. Once true it stays true; while false, the logdir is
        walked again at most every `ACTIVE_RECHECK_S` seconds (TensorBoard asks often)."""
        now = time.monotonic()
        if not self._active and (
            self._checked_at is None or now - self._checked_at >= ACTIVE_RECHECK_S
        ):
            self._checked_at = now
            self._active = next(iter_runs(self._logdir), None) is not None
        return self._active

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps = {route: self._static_app(route, kind) for route, kind in STATIC_FILES.items()}
        apps["/runs"] = self._json_app(self._runs_route)
        apps["/scores"] = self._json_app(self._scores_route)
        apps["/attention"] = self._json_app(self._attention_route)
        apps["/trend"] = self._json_app(self._trend_route)
        return apps

    def _runs_route(self, request: wrappers.Request) -> dict[str, Any]:
        return runs_impl(self._logdir)

    def _scores_route(self, request: wrappers.Request) -> dict[str, Any]:
        return scores_impl(self._logdir, _arg(request, "run"), _int_arg(request, "step"))

    def _attention_route(self, request: wrappers.Request) -> dict[str, Any]:
        return attention_impl(
            self._logdir,
            _arg(request, "run"),
            _int_arg(request, "step"),
            _arg(request, "probe"),
            request.args.get("view", "attention"),
            _int_arg(request, "layer"),
            _int_arg(request, "head"),
            _flag_arg(request, "words"),
        )

    def _trend_route(self, request: wrappers.Request) -> dict[str, Any]:
        return trend_impl(
            self._logdir,
            _arg(request, "run"),
            _arg(request, "pattern"),
            _int_arg(request, "layer"),
            _int_arg(request, "head"),
        )

    def _json_app(self, handler: Callable[[wrappers.Request], Any]) -> Callable:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                body, code = handler(request), 200
            except RequestError as exc:
                body, code = {"error": str(exc)}, exc.code
            except Exception:  # a bug must not show a traceback in the browser
                logger.exception("attnlog plugin: %s failed", request.path)
                body = {"error": "could not read the archive; the TensorBoard log has the cause"}
                code = 500
            return http_util.Respond(request, body, "application/json", code=code)

        return app

    def _static_app(self, route: str, content_type: str) -> Callable:
        body = (STATIC / route.lstrip("/")).read_bytes()

        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            return http_util.Respond(request, body, content_type)

        return app


def _arg(request: wrappers.Request, name: str) -> str:
    value = request.args.get(name)
    if value is None or value == "":
        raise RequestError(400, f"missing query parameter {name!r}")
    return value


_ASCII_INT = re.compile(r"[0-9]{1,9}")  # not `\d`: it matches full-width and other digits


def _int_arg(request: wrappers.Request, name: str) -> int:
    text = _arg(request, name)
    if not _ASCII_INT.fullmatch(text):
        raise RequestError(400, f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def _flag_arg(request: wrappers.Request, name: str) -> bool:
    """An optional on/off parameter: absent, "0" or "1"."""
    text = request.args.get(name, "0")
    if text not in ("0", "1"):
        raise RequestError(400, f"{name} must be 0 or 1, got {text[:40]!r}")
    return text == "1"
