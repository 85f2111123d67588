"""TensorBoard's "Attention" tab: browse the archived attention of every logged step.

The archive (`<run>/plugins/attnlog/step_<8 digits>.npz` + `index.jsonl`) is not an event file,
so this plugin reads it from the log folder directly instead of through the data provider.
Every route answers small JSON (one head's matrix at a time); the page is an ES module that
TensorBoard loads into an iframe (see `FrontendMetadata.es_module_path`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from attnlog.sinks.archive import INDEX, read_index
from attnlog.sinks.base import plugin_dir
from attnlog.snapshot import load

logger = logging.getLogger(__name__)

PLUGIN_NAME = "attnlog"
STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"/index.js": "text/javascript", "/style.css": "text/css"}
# view -> (row tokens, column tokens) of its [L, H, rows, cols] matrix
VIEWS = {
    "attention": ("tokens", "tokens"),
    "decoder_attention": ("decoder_tokens", "decoder_tokens"),
    "cross_attention": ("decoder_tokens", "tokens"),
}


class RequestError(Exception):
    """A client mistake, answered as `{"error": message}` with `code` (never a traceback)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class AttentionPlugin(base_plugin.TBPlugin):
    """The "Attention" tab. Runs are the folders under the logdir (itself included, as ".")
    that hold an attnlog archive."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = Path(context.logdir).expanduser() if context.logdir else None

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Attention")

    def is_active(self) -> bool:
        return next(self._iter_runs(), None) is not None

    def get_plugin_apps(self) -> dict[str, Callable]:
        apps = {route: self._static_app(route, kind) for route, kind in STATIC_FILES.items()}
        apps["/runs"] = self._json_app(self._runs)
        apps["/scores"] = self._json_app(self._scores)
        apps["/attention"] = self._json_app(self._attention)
        apps["/trend"] = self._json_app(self._trend)
        return apps

    # ---- routes ------------------------------------------------------------------------------

    def _runs(self, request: wrappers.Request) -> dict[str, Any]:
        """run -> [{step, patterns, probes: [{name, shapes: {view: [L, H, rows, cols]}}]}]."""
        out = {}
        for run, folder in self._iter_runs():
            steps = []
            for entry in read_index(folder):
                try:
                    probes = _probe_shapes(*_cache_key(_archive_path(folder, entry)))
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                    logger.warning("attnlog: skipping unreadable archive in %s: %s", run, exc)
                    continue
                steps.append(
                    {"step": entry["step"], "patterns": entry.get("patterns", []), "probes": probes}
                )
            out[run] = steps
        return out

    def _scores(self, request: wrappers.Request) -> dict[str, Any]:
        """Every pattern's [layer][head] score matrix at one step (null where undefined)."""
        run, folder = self._run(request)
        entry = _entry(folder, request)
        scores = _load_scores(*_cache_key(_archive_path(folder, entry)))
        return {
            "run": run,
            "step": entry["step"],
            "scores": {name: _clean(matrix) for name, matrix in sorted(scores.items())},
        }

    def _attention(self, request: wrappers.Request) -> dict[str, Any]:
        """One head of one probe at one step: row/column tokens and the matrix (4 decimals)."""
        run, folder = self._run(request)
        entry = _entry(folder, request)
        view = request.args.get("view", "attention")
        if view not in VIEWS:
            raise RequestError(400, f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        name = _arg(request, "probe")
        snapshot, _ = _load_snapshot(*_cache_key(_archive_path(folder, entry)))
        probe = next((p for p in snapshot.probes if p.name == name), None)
        if probe is None:
            names = ", ".join(p.name for p in snapshot.probes)
            raise RequestError(404, f"step {entry['step']} has no probe {name!r} (it has {names})")
        weights = getattr(probe, view)
        if weights is None:
            raise RequestError(404, f"probe {name!r} has no {view} (not an encoder-decoder)")
        layer = _int_arg(request, "layer", limit=weights.shape[0], what="layers")
        head = _int_arg(request, "head", limit=weights.shape[1], what="heads")
        rows, cols = VIEWS[view]
        return {
            "run": run,
            "step": entry["step"],
            "probe": name,
            "view": view,
            "layer": layer,
            "head": head,
            "query_tokens": getattr(probe, rows),
            "tokens": getattr(probe, cols),
            "matrix": _clean(weights[layer, head], digits=4),
        }

    def _trend(self, request: wrappers.Request) -> dict[str, Any]:
        """One head's score for one pattern at every logged step (null where not scored)."""
        run, folder = self._run(request)
        pattern = _arg(request, "pattern")
        layer = _int_arg(request, "layer")
        head = _int_arg(request, "head")
        steps, values, seen = [], [], False
        for entry in read_index(folder):
            try:
                matrix = _load_scores(*_cache_key(_archive_path(folder, entry))).get(pattern)
            except RequestError:
                continue  # an indexed file that is gone: leave the step out
            seen = seen or matrix is not None
            value = None
            if matrix is not None and layer < matrix.shape[0] and head < matrix.shape[1]:
                value = float(matrix[layer, head])
            steps.append(entry["step"])
            values.append(value if value is not None and math.isfinite(value) else None)
        if not seen:
            raise RequestError(404, f"run {run!r} has no scores for pattern {pattern!r}")
        return {
            "run": run,
            "pattern": pattern,
            "layer": layer,
            "head": head,
            "steps": steps,
            "values": values,
        }

    # ---- helpers -----------------------------------------------------------------------------

    def _iter_runs(self) -> Iterator[tuple[str, Path]]:
        """(name, folder) of every folder holding an archive index, in a stable order."""
        if self._logdir is None or not self._logdir.is_dir():
            return
        for folder, subdirs, _ in os.walk(self._logdir):
            path = Path(folder)
            if (plugin_dir(path) / INDEX).is_file():
                yield path.relative_to(self._logdir).as_posix(), path
            subdirs[:] = sorted(d for d in subdirs if d != "plugins")  # plugin data, not runs

    def _run(self, request: wrappers.Request) -> tuple[str, Path]:
        """The `run` query parameter as a folder inside the logdir, or a 400/404."""
        run = _arg(request, "run")
        if ".." in re.split(r"[\\/]", run) or os.path.isabs(run) or "\0" in run:
            raise RequestError(400, f"run must be a run name listed by /runs, got {run!r}")
        if self._logdir is None:
            raise RequestError(404, "TensorBoard was started without a --logdir")
        folder = self._logdir / run
        inside = folder.resolve().is_relative_to(self._logdir.resolve())
        if not inside or not (plugin_dir(folder) / INDEX).is_file():
            raise RequestError(404, f"no attnlog archive for run {run!r}")
        return run, folder

    def _json_app(self, handler: Callable[[wrappers.Request], Any]) -> Callable:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                body, code = handler(request), 200
            except RequestError as exc:
                body, code = {"error": str(exc)}, exc.code
            except Exception:  # a broken archive must not show a traceback in the browser
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


def _int_arg(request: wrappers.Request, name: str, limit: int | None = None, what: str = "") -> int:
    text = _arg(request, name)
    if not re.fullmatch(r"\d{1,9}", text):
        raise RequestError(400, f"{name} must be a non-negative integer, got {text!r}")
    value = int(text)
    if limit is not None and value >= limit:
        raise RequestError(400, f"{name} {value} is out of range: there are {limit} {what}")
    return value


def _entry(folder: Path, request: wrappers.Request) -> dict[str, Any]:
    step = _int_arg(request, "step")
    for entry in read_index(folder):
        if entry["step"] == step:
            return entry
    raise RequestError(404, f"step {step} was not logged in this run")


def _archive_path(folder: Path, entry: dict[str, Any]) -> Path:
    return plugin_dir(folder) / Path(entry["file"]).name  # the index cannot point elsewhere


def _cache_key(path: Path) -> tuple[str, int]:
    """(path, mtime): a step rewritten by a resumed run is read again, not served stale."""
    try:
        return str(path), path.stat().st_mtime_ns
    except FileNotFoundError:
        raise RequestError(404, f"archive file {path.name} is missing") from None


@functools.lru_cache(maxsize=8)  # whole steps can be large: keep only a few
def _load_snapshot(path: str, mtime_ns: int) -> tuple[Any, dict[str, np.ndarray]]:
    return load(path)


@functools.lru_cache(maxsize=4096)
def _load_scores(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    """Only the `[L, H]` score arrays: the trend over many steps never decompresses attention."""
    with np.load(path, allow_pickle=False) as data:
        return {k[len("scores/") :]: data[k] for k in data.files if k.startswith("scores/")}


@functools.lru_cache(maxsize=4096)
def _probe_shapes(path: str, mtime_ns: int) -> list[dict[str, Any]]:
    """Probe names and array shapes from the archive's metadata and `.npy` headers only."""
    with zipfile.ZipFile(path) as archive:
        with archive.open("meta.npy") as fh:
            meta = json.loads(np.lib.format.read_array(fh).tobytes())
        names = set(archive.namelist())
        probes = []
        for i, probe in enumerate(meta["probes"]):
            shapes = {}
            for view in VIEWS:
                member = f"p{i}/{view}.npy"
                if member in names:
                    with archive.open(member) as fh:
                        shapes[view] = list(_npy_shape(fh))
            probes.append({"name": probe["name"], "shapes": shapes})
    return probes


def _npy_shape(fh: Any) -> tuple[int, ...]:
    version = np.lib.format.read_magic(fh)
    header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    return header(fh)[0]


def _clean(matrix: np.ndarray, digits: int | None = None) -> list:
    """Nested lists for JSON: NaN/inf -> null, optionally rounded (keeps responses small)."""
    values = np.asarray(matrix, dtype=np.float64)
    if digits is not None:
        values = np.round(values, digits)
    return [[v if math.isfinite(v) else None for v in row] for row in values.tolist()]
