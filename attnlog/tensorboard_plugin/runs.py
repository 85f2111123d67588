"""Runs and steps for the Attention tab: which folders are runs, which steps they logged, and
the cached readers of their archive files.

A run's steps come from its score table (`attnlog.score_history`: one file, whatever the run's length),
or, for archives written before the table existed, from its index and step files. Both are
cached by file size and mtime, so TensorBoard's polling re-reads only what changed.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.layout import INDEX, archive_name, plugin_dir, probe_shapes, read_index
from attnlog.notes import warn_once
from attnlog.report import load
from attnlog.score_history import TABLE_DIR, RunTable, read_table
from attnlog.snapshot import Snapshot, load_scores

__all__ = [
    "RequestError",
    "Steps",
    "iter_runs",
    "load_by_key",
    "load_snapshot",
    "load_step_scores",
    "present",
    "run_folder",
    "run_steps",
    "step_file",
    "step_key",
]

MAX_RUN_NAME = 1024  # longer `run` values are refused before touching the file system


class RequestError(Exception):
    """A client mistake, answered as `{"error": message}` with `code` (never a traceback)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---- runs -------------------------------------------------------------------------------------


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


# ---- the steps of a run -----------------------------------------------------------------------


class Steps:
    """A run's logged steps (sorted), each with a layout: `{patterns, scores: [L, H], probes}`
    (probes as `layout.probe_shapes`). `table` is the run's score table, None for an older archive."""

    def __init__(self, steps: list[int], layout_of: list[int], layouts: list[dict], table=None):
        self.steps = steps
        self.layout_of = layout_of
        self.layouts = layouts
        self.table: RunTable | None = table
        self.sizes = None if table is None else table.sizes.tolist()
        self.position = {s: i for i, s in enumerate(steps)}
        self._paths: list[str] | None = None

    def paths(self, folder: Path) -> list[str]:
        """The path of each step's archive file, as a string (`os.stat` takes it as it is);
        made once per `Steps` (which `run_steps` caches while the run's files stay the same)."""
        if self._paths is None:
            archive = str(plugin_dir(folder))
            self._paths = [os.path.join(archive, archive_name(step)) for step in self.steps]
        return self._paths

    def find(self, step: int) -> int:
        """The position of `step`, or a 404 naming it."""
        if step not in self.position:
            raise RequestError(404, f"step {step} was not logged in this run")
        return self.position[step]


def run_steps(folder: Path) -> Steps:
    """The run's steps: from its score table when it has one, else from its index."""
    found = _table_steps(folder, _signature(plugin_dir(folder) / TABLE_DIR))
    if found is None:
        found = _index_steps(folder, _signature(plugin_dir(folder) / INDEX))
    return found


def _signature(path: Path) -> tuple:
    """What changes when `path` (a file, or a folder of files) is written: names, sizes, mtimes."""
    try:
        if path.is_dir():
            return tuple(sorted((e.name, *_stamp(e.stat())) for e in os.scandir(path)))
        return _stamp(path.stat())
    except OSError:
        return ()


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _table_steps(folder: Path, signature: tuple) -> Steps | None:
    try:
        table = read_table(folder)
    except (OSError, ValueError) as exc:  # a damaged table: the step files still serve
        warn_once(folder, f"attnlog: cannot read the score table of {folder}; skipped: {exc}")
        return None
    if table is None:
        return None
    layouts = [
        {"patterns": h["patterns"], "scores": [h["layers"], h["heads"]], "probes": h["probes"]}
        for h in table.layouts
    ]
    return Steps(table.steps.tolist(), table.layout_of.tolist(), layouts, table)


@functools.lru_cache(maxsize=32)
def _index_steps(folder: Path, signature: tuple) -> Steps:
    """An archive without a score table: its index, with the layouts told apart."""
    steps, layout_of, layouts, known = [], [], [], {}
    for entry in read_index(folder):
        probes = entry.get("probe_shapes")
        if not isinstance(probes, list):  # an older index: read the archive once
            snapshot = load_snapshot(folder, entry["step"])
            if snapshot is None:
                continue
            probes = [probe_shapes(p) for p in snapshot.probes]
        shape = next(iter(probes[0]["shapes"].values()), [0, 0]) if probes else [0, 0]
        layout = {"patterns": entry.get("patterns", []), "scores": shape[:2], "probes": probes}
        key = json.dumps(layout, sort_keys=True)
        if key not in known:
            known[key] = len(layouts)
            layouts.append(layout)
        steps.append(entry["step"])
        layout_of.append(known[key])
    return Steps(steps, layout_of, layouts)


# ---- step files -------------------------------------------------------------------------------


def step_file(folder: Path, step: int) -> Path:
    """The archive file of `step` (the name its index line gives)."""
    return plugin_dir(folder) / archive_name(step)


_damaged: set[tuple[str, int]] = (
    set()
)  # (path, mtime) of archive files that failed to load: a cache, not a warning


def present(folder: Path, found: Steps) -> list[int]:
    """Positions of the steps whose archive file is there, whole (of the size the score table
    recorded, when there is one) and not known to be damaged: one `stat` per step, no file
    opened, so a run of 10,000 steps is checked in milliseconds."""
    keep = []
    for i, (step, path) in enumerate(zip(found.steps, found.paths(folder), strict=True)):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if found.sizes is not None and st.st_size != found.sizes[i]:
            warn_once(path, f"attnlog: step {step}: {path} is cut short; skipped")
            continue
        if (path, st.st_mtime_ns) not in _damaged:
            keep.append(i)
    return keep


def _key(folder: Path, step: int) -> tuple[str, int] | None:
    """(path, mtime) of the step's archive file; None (warned once) when missing or bad."""
    path = step_file(folder, step)
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        warn_once(path, f"attnlog: step {step}: {path} is missing; skipped")
        return None
    return None if key in _damaged else key


def _read(folder: Path, step: int, reader: Callable) -> Any:
    """`reader(path, mtime)`, or None (warned once, remembered) when the file cannot be read."""
    key = _key(folder, step)
    if key is None:
        return None
    try:
        return reader(*key)
    except Exception as exc:  # truncated, not an archive, a newer format
        _damaged.add(key)
        warn_once(key, f"attnlog: step {step}: cannot read {key[0]}; skipped: {exc}")
        return None


def load_snapshot(folder: Path, step: int) -> Snapshot | None:
    return _read(folder, step, load_by_key)


def load_step_scores(folder: Path, step: int) -> dict[str, np.ndarray] | None:
    return _read(folder, step, _scores)


def step_key(folder: Path, step: int) -> tuple[str, int] | None:
    """(path, mtime) of the step's archive file, the key of `load_by_key`; None when missing."""
    return _key(folder, step)


@functools.lru_cache(maxsize=8)  # whole steps can be large: keep only a few
def load_by_key(path: str, mtime_ns: int) -> Snapshot:
    """(path, mtime) keyed: a step rewritten by a resumed run is read again, not served stale."""
    return load(path)


@functools.lru_cache(maxsize=4096)
def _scores(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    """Only the `[L, H]` scores: attention is never read."""
    return load_scores(path)
