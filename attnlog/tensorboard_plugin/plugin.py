"""TensorBoard's "Attention" tab: browse the archived attention of every logged step.

The archive (`<run>/plugins/attnlog/index.jsonl` + one `.npz` per step, see `attnlog.layout`) is
not an event file, so this plugin reads it from the log folder directly instead of through the
data provider, with the archive's own readers (`attnlog.snapshot.load`, `load_scores`). Every route answers
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
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from attnlog.layout import json_matrix
from attnlog.snapshot import ProbeAttention
from attnlog.tensorboard_plugin.runs import (
    RequestError,
    iter_runs,
    load_by_key,
    load_snapshot,
    load_step_scores,
    present,
    run_folder,
    run_steps,
    step_key,
)
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
ACTIVE_RECHECK_S = 30.0  # how often `is_active` may walk the logdir again while it finds nothing


# ---- the routes as plain functions ----------------------------------------------------------


def runs_impl(logdir: Path | None) -> dict[str, list[dict[str, Any]]]:
    """run -> [{step, layout, patterns, scores: [L, H], probes: [{name, pooled, shapes: {view:
    [L, H, rows, cols]}}]}] for the steps whose archive file is there. A layout (patterns,
    probes and their shapes) is given in full at its first step only; later steps name it by
    `layout`, so that a run of 10,000 steps is a small answer."""
    out = {}
    for run, folder in iter_runs(logdir):
        found = run_steps(folder)
        listed, seen = [], set()
        for i in present(folder, found):
            layout = found.layout_of[i]
            item = {"step": found.steps[i], "layout": layout}
            if layout not in seen:
                seen.add(layout)
                item.update(found.layouts[layout])
            listed.append(item)
        out[run] = listed
    return out


def scores_impl(logdir: Path | None, run: str, step: int) -> dict[str, Any]:
    """Every pattern's [layer][head] score matrix at one step (null where undefined)."""
    folder = run_folder(logdir, run)
    run_steps(folder).find(step)
    scores = load_step_scores(folder, step)
    if scores is None:
        raise RequestError(404, f"the archive file of step {step} is missing or damaged")
    return {
        "run": run,
        "step": step,
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
    found = _probe(folder, step, probe)
    if words:
        found = _word_view(folder, step, found)
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
        "step": step,
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


def _probe(folder: Path, step: int, name: str) -> ProbeAttention:
    """The probe `name` of a logged step, or a 404 saying what is missing."""
    run_steps(folder).find(step)
    snapshot = load_snapshot(folder, step)
    if snapshot is None:
        raise RequestError(404, f"the archive file of step {step} is missing or damaged")
    found = next((p for p in snapshot.probes if p.name == name), None)
    if found is None:
        names = ", ".join(p.name for p in snapshot.probes)
        raise RequestError(404, f"step {step} has no probe {name!r} (it has {names})")
    return found


def trend_impl(logdir: Path | None, run: str, pattern: str, layer: int, head: int) -> dict:
    """One head's score for one pattern at every step whose file is there (null where not
    scored): from the run's score table, or from every step file for an archive without one."""
    folder = run_folder(logdir, run)
    found = run_steps(folder)
    shapes = [_score_shape(layout, pattern) for layout in found.layouts]
    if not any(shapes):
        raise RequestError(404, f"run {run!r} has no scores for pattern {pattern!r}")
    _in_range("layer", layer, max(s[0] for s in shapes if s), "layers")
    _in_range("head", head, max(s[1] for s in shapes if s), "heads")
    if found.table is not None:
        keep = present(folder, found)
        values = found.table.trend(pattern, layer, head)[keep].tolist()
        steps = [found.steps[i] for i in keep]
    else:
        steps, values = _trend_from_files(folder, found.steps, pattern, layer, head)
    return {
        "run": run,
        "pattern": pattern,
        "layer": layer,
        "head": head,
        "steps": steps,
        "values": json_matrix([values])[0],
    }


def _score_shape(layout: dict, pattern: str) -> tuple[int, int] | None:
    return tuple(layout["scores"]) if pattern in layout["patterns"] else None


def _trend_from_files(folder: Path, steps: list[int], pattern: str, layer: int, head: int):
    """An archive written before the score table: one step file at a time (readable ones)."""
    kept, values = [], []
    for step in steps:
        scores = load_step_scores(folder, step)
        if scores is None:
            continue  # missing or damaged: leave the step out
        matrix = scores.get(pattern)
        value = None
        if matrix is not None and layer < matrix.shape[0] and head < matrix.shape[1]:
            value = float(matrix[layer, head])
        kept.append(step)
        values.append(value)
    return kept, values


def _word_view(folder: Path, step: int, probe: ProbeAttention) -> ProbeAttention:
    """The probe's word view, or a 404 for a pooled probe or one whose words cannot be told."""
    if probe.labels is not None:
        raise RequestError(
            404, f"probe {probe.name!r} is stored by token block (a long probe): no word view"
        )
    key = step_key(folder, step)
    if key is None:
        raise RequestError(404, f"the archive file of step {step} is missing or damaged")
    try:
        return _words(*key, probe.name)
    except ValueError as exc:  # word ids that do not fit the tokens
        raise RequestError(404, f"probe {probe.name!r} has no word view: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _words(path: str, mtime_ns: int, name: str) -> ProbeAttention:
    """(path, mtime, probe) keyed like `load_by_key`: each step's word view is aggregated once."""
    return word_probe(next(p for p in load_by_key(path, mtime_ns).probes if p.name == name))


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
            # Serialised here: TensorBoard's own path walks every value again (json_util.Cleanse),
            # which costs more than the route itself for a run of 10,000 steps. Values are
            # already JSON-safe (`json_matrix` turns NaN into null).
            text = json.dumps(body, allow_nan=False)
            return http_util.Respond(request, text, "application/json", code=code)

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
