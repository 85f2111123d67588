"""The per-run score table: every archived step's pattern scores and probe shapes in a few
append-only files, so that browsing a long run (the Attention tab's step list and trend,
`attnlog report`'s step list) reads one file instead of one archive per step.

Written by the archive sink at each event, before the step's index line; read by the plugin and
the CLI. Layout, under `<logdir>/plugins/attnlog/`::

    scores/<layout id>.bin   one file per layout (patterns, layers, heads, probes, model type):
        b"attnlog.scores 1 " + JSON header + b"\\n"
        records of fixed size: seq i8, step i8, size i8, scores f4[patterns, layers, heads],
        check i8

`size` is the step file's size as written: a reader tells a truncated step file without
opening it. `seq` orders records across files (a step logged again by a resumed run: the
highest wins). `check` (`step ^ seq ^ MAGIC`) marks a complete record: a record torn by a crash is ignored by
readers and cut by the next append. A run whose archive predates the table has no `scores/`
folder, or a header with `"partial": true` (the table was started on a run that already had
steps): `read_table` returns None and readers go to the step files as before. A table the
writer cannot append to (damaged, or scores it cannot hold) is set aside (`abandon`), so that it
never misses a step that the index has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.layout import archive_name, plugin_dir

__all__ = ["TABLE_DIR", "RunTable", "abandon", "append_scores", "logged_steps", "read_table"]

TABLE_DIR = "scores"
MAGIC = 0x61746E6C6F67  # "atnlog": a zero-filled or torn record never checks out
_PREFIX = b"attnlog.scores 1 "


def _dtype(header: dict[str, Any]) -> np.dtype:
    shape = (len(header["patterns"]), header["layers"], header["heads"])
    fields = [("seq", "<i8"), ("step", "<i8"), ("size", "<i8"), ("scores", "<f4", shape)]
    return np.dtype([*fields, ("check", "<i8")])


# ---- writing (the archive sink, under its index lock) ---------------------------------------


def append_scores(
    folder: Path, step: int, scores: dict[str, Any], layout: dict[str, Any], partial: bool
) -> None:
    """Append one step's `[L, H]` scores to the table of its layout (created when new).

    Args:
        folder: the archive folder (`plugin_dir(logdir)`), where the step file is written.
        layout: what readers list per step without opening it: `probes` (`layout.probe_shapes`
            of each probe) and `model_type`.
        partial: steps were archived before this table existed (used only when creating it).

    Raises:
        ValueError: the scores are not all `[L, H]` of one shape (the step is then not indexed).
    """
    names = sorted(scores)
    arrays = [np.asarray(scores[n], dtype=np.float32) for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"pattern scores must all be [layers, heads] of one shape, got {shapes}")
    layers, heads = next(iter(shapes), (0, 0))
    header = {"patterns": names, "layers": layers, "heads": heads, **layout}
    path = _table_path(folder, header, partial)
    dtype = _dtype(header)
    record = np.zeros((), dtype)
    record["seq"] = _next_seq(folder)
    record["step"] = step
    record["size"] = (folder / archive_name(step)).stat().st_size
    if arrays:
        record["scores"] = np.stack(arrays)
    record["check"] = step ^ int(record["seq"]) ^ MAGIC
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        start = _header_size(path)
        torn = (os.fstat(fd).st_size - start) % dtype.itemsize
        if torn:  # a crash cut the last record: drop it, so that the rest stays aligned
            os.ftruncate(fd, os.fstat(fd).st_size - torn)
        data = record.tobytes()
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def abandon(folder: Path) -> None:
    """Set the run's tables aside (renamed, kept for inspection): readers then read the step
    files, and later events start a table marked partial, which readers do not trust either."""
    tables = folder / TABLE_DIR
    with contextlib.suppress(OSError):
        tables.rename(folder / f"{TABLE_DIR}.abandoned.{os.getpid()}.{secrets.token_hex(4)}")


def _table_path(folder: Path, header: dict[str, Any], partial: bool) -> Path:
    """The layout's table file, created (atomically, header complete) when it does not exist."""
    key = json.dumps(header, sort_keys=True).encode()
    path = folder / TABLE_DIR / f"{hashlib.sha1(key).hexdigest()[:16]}.bin"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial and not any(path.parent.glob("*.bin"))  # only the first table may be
    text = json.dumps({**header, "partial": partial}, ensure_ascii=False)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(_PREFIX + text.encode() + b"\n")
    tmp.replace(path)
    return path


def _next_seq(folder: Path) -> int:
    """One more than the records of every table: later records win, in any file."""
    total = 0
    for path in (folder / TABLE_DIR).glob("*.bin"):
        header, start = _header(path)
        total += (path.stat().st_size - start) // _dtype(header).itemsize
    return total + 1


def _header_size(path: Path) -> int:
    with open(path, "rb") as fh:
        return len(fh.readline())


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as fh:
        line = fh.readline(1 << 20)
    if not line.startswith(_PREFIX) or not line.endswith(b"\n"):
        raise ValueError(f"{path} is not an attnlog score table")
    return json.loads(line[len(_PREFIX) :]), len(line)


# ---- reading --------------------------------------------------------------------------------


@dataclass
class RunTable:
    """Every step of a run's table: `steps` (sorted), and per step its layout and scores."""

    steps: np.ndarray  # int64 [S]
    sizes: np.ndarray  # int64 [S]: the size of each step's file as written
    layouts: list[dict[str, Any]]  # one header per table file
    layout_of: np.ndarray  # int [S]: index into `layouts` / `_records`
    rows: np.ndarray  # int [S]: the step's record in its file
    _records: list[np.ndarray]

    def layout(self, i: int) -> dict[str, Any]:
        """The header (patterns, layers, heads, probes, model_type) of the i-th step."""
        return self.layouts[self.layout_of[i]]

    def scores(self, i: int) -> dict[str, np.ndarray]:
        """The i-th step's scores, `{pattern: [L, H] float32}`, as its archive file holds them."""
        record = np.array(self._records[self.layout_of[i]][self.rows[i]])  # a copy, not a mapping
        return dict(zip(self.layout(i)["patterns"], record["scores"], strict=True))

    def trend(self, pattern: str, layer: int, head: int) -> np.ndarray:
        """One head's score at every step (NaN where the step's layout lacks it)."""
        values = np.full(len(self.steps), np.nan, np.float32)
        for f, (header, records) in enumerate(zip(self.layouts, self._records, strict=True)):
            where = self.layout_of == f
            if (
                pattern in header["patterns"]
                and layer < header["layers"]
                and head < header["heads"]
            ):
                column = records["scores"][:, header["patterns"].index(pattern), layer, head]
                values[where] = column[self.rows[where]]
        return values


def read_table(logdir: str | os.PathLike) -> RunTable | None:
    """The run's score table, or None when the run has none that covers every step (archives
    written before the table existed: read the step files). Torn or damaged records are left out.

    Raises:
        ValueError: a table file is damaged beyond its last record (not an attnlog table).
    """
    folder = plugin_dir(logdir) / TABLE_DIR
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".bin" and p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return None
    layouts, records = [], []
    for path in paths:
        header, start = _header(path)
        if header.get("partial"):
            return None
        records.append(_records(path, header, start))
        layouts.append(header)
    if not layouts:
        return None
    return _index(layouts, records)


def _records(path: Path, header: dict[str, Any], start: int) -> np.ndarray:
    """The file's whole records, mapped (only the pages a reader touches are read: the steps
    of 10,000 records, or one score column, not all their scores)."""
    dtype = _dtype(header)
    count = (path.stat().st_size - start) // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(count,))


def _index(layouts: list[dict[str, Any]], records: list[np.ndarray]) -> RunTable:
    """Per step, its latest complete record (highest `seq`) over all files; steps sorted.
    A record whose check does not match (torn, zero-filled by a crash) is left out."""
    ok = [(r["check"] == r["step"] ^ r["seq"] ^ MAGIC) & (r["step"] >= 0) for r in records]
    seq = np.concatenate([r["seq"][k] for r, k in zip(records, ok, strict=True)])
    step = np.concatenate([r["step"][k] for r, k in zip(records, ok, strict=True)])
    size = np.concatenate([r["size"][k] for r, k in zip(records, ok, strict=True)])
    file = np.concatenate([np.full(k.sum(), f) for f, k in enumerate(ok)]).astype(np.int64)
    row = np.concatenate([np.flatnonzero(k) for k in ok]).astype(np.int64)
    order = np.lexsort((seq, step))  # by step, then seq: the last of each step wins
    step, size, file, row = step[order], size[order], file[order], row[order]
    last = np.ones(len(step), bool)
    last[:-1] = step[1:] != step[:-1]
    return RunTable(step[last], size[last], layouts, file[last], row[last], records)


def logged_steps(logdir: str | os.PathLike) -> list[int] | None:
    """The run's archived steps from its score table (one file read, whatever the run's
    length), or None when the run has no complete table: use `layout.read_index` then.
    A step's archive file is `plugin_dir(logdir) / archive_name(step)`."""
    table = read_table(logdir)
    return None if table is None else [int(s) for s in table.steps]
