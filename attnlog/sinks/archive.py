"""The local archive: raw attention of every logged step, read back by the TensorBoard tab,
`attnlog report` and `attnlog compare`.

Layout under `plugin_dir(logdir)` (see `attnlog.layout`):
    step_<8 digits>.npz   one `Snapshot.save` archive per step, pattern scores included
    index.jsonl           one JSON line per step: step, file, probes, model_type, patterns,
                          probe_shapes (`layout.probe_shapes`, so readers need not open files)
    index.lock            taken (fcntl.flock) around every index and table update
    training.lock         the training that owns the archive (`attnlog.sinks.owner`)
    scores/<id>.bin       the run's score table (`attnlog.score_history`): what browsing a long run
                          reads instead of every step file

Two trainings in one logdir would overwrite each other's steps, so the logger claims the
archive for its training when it is built (`attnlog.sinks.owner`), and this sink refuses to
start when a live training other than its own process or its parent (the training a writer
process serves: a restarted writer is never refused) holds it. Sinks without a claim (two jobs
given one folder through this class directly) still save through temporary names of their own
and update the index under a file lock, so neither corrupts the other's files.

This sink is the only writer of the archive; the other sinks ignore `log_archive`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlog.layout import INDEX, archive_name, plugin_dir, probe_shapes, read_index
from attnlog.notes import warn_once
from attnlog.score_history import TABLE_DIR, abandon, append_scores
from attnlog.sinks.base import Sink, check_writable_dir
from attnlog.sinks.owner import check_owner

if TYPE_CHECKING:
    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

__all__ = ["ArchiveSink", "remove_stale_temporaries", "write_all"]

LOCK = "index.lock"
_TMP_GLOB = "step_*.npz*.tmp"  # ours: step_X.npz.<pid>.<hex>.tmp (+ Snapshot.save's own .tmp)

# A planted link in a shared logdir (index.jsonl -> ~/.bashrc) must not make the writer append to
# its target: such a link fails to open, and the sink's error is contained and reported.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows, which has no such links by default


class ArchiveSink(Sink):
    """Writes `step_<8 digits>.npz` and its `index.jsonl` line at every `log_archive`.

    Args:
        logdir: the run's log folder; the archive goes to `<logdir>/plugins/attnlog/`.

    Raises:
        ValueError, PermissionError: `logdir` can never be written (checked before training).
        LogdirInUseError: another training is logging to `logdir`.
    """

    name = "archive"

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.folder = check_writable_dir(plugin_dir(logdir), "archive folder")
        self.logdir = Path(logdir)
        check_owner(logdir, allowed=(os.getpid(), os.getppid()))
        self._steps: set[int] | None = None  # steps already in the index, read on first use

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        """Save the step's archive, then index it (readers only see indexed, complete files)."""
        step = int(step)
        if self._steps is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.folder)
        name = archive_name(step)
        tmp = self.folder / f"{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            self._save(snapshot, table, tmp)
            tmp.replace(self.folder / name)
        except BaseException:
            for leftover in (tmp, tmp.with_name(tmp.name + ".tmp")):
                leftover.unlink(missing_ok=True)  # a full disk must not leave a half file behind
            raise
        shapes = [probe_shapes(p) for p in snapshot.probes]
        entry = {
            "step": step,
            "file": name,
            "probes": [p.name for p in snapshot.probes],
            "model_type": snapshot.model_type,
            "patterns": sorted(table.scores),
            "probe_shapes": shapes,
        }
        with self._locked():
            if self._steps is None:
                self._steps = {e["step"] for e in read_index(self.logdir)}
            layout = {"probes": shapes, "model_type": snapshot.model_type}
            self._tabulate(step, table.scores, layout)
            if step in self._steps:
                self._rewrite_index(entry)  # a resumed run logs this step again: replace its line
            else:
                self._append_index(entry)
        self._steps.add(step)

    def _tabulate(self, step: int, scores: dict, layout: dict) -> None:
        """Append the step to the score table, before its index line: an indexed step is always
        in the table. A table that cannot take it is set aside (readers then use the step
        files): the archive itself must go on."""
        try:
            append_scores(self.folder, step, scores, layout, bool(self._steps - {step}))
        except (OSError, ValueError) as exc:
            abandon(self.folder)
            warn_once(
                self.folder / TABLE_DIR,
                f"attnlog: the score table of {self.logdir} was set aside ({exc}); the archive "
                "goes on, and browsing it reads every step file (slower on long runs)",
            )

    def _save(self, snapshot: Snapshot, table: ScoreTable, path: Path) -> None:
        """Write the step's archive file (a method so that a benchmark can copy one instead)."""
        snapshot.save(path, scores=table.scores)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on `index.lock` (advisory: readers never need it)."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writer per logdir there
            yield
            return
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _append_index(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        # One O_APPEND write: a concurrent reader sees the whole line or none of it.
        fd = os.open(self.folder / INDEX, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crash left the last line torn: start a new one
            write_all(fd, line)
        finally:
            os.close(fd)

    def _rewrite_index(self, entry: dict[str, Any]) -> None:
        entries = [e for e in read_index(self.logdir) if e["step"] != entry["step"]]
        entries = sorted([*entries, entry], key=lambda e: e["step"])
        tmp = self.folder / f"{INDEX}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        tmp.replace(self.folder / INDEX)


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (it may write fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `step_*.npz*.tmp` files left by saves that died (their process is gone).

    A temporary of a live process (another writer on the same logdir) is kept.
    """
    removed = []
    for path in folder.glob(_TMP_GLOB):
        parts = path.name.split(".")  # step_X, npz, <pid>, <hex>, tmp[, tmp]
        pid = int(parts[2]) if len(parts) >= 5 and parts[2].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
