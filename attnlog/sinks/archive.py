"""The local archive: raw attention of every logged step, read back by the TensorBoard tab,
`attnlog report` and `attnlog compare`.

Layout under `<logdir>/plugins/attnlog/`:
    step_<8 digits>.npz   one `Snapshot.save` archive per step, pattern scores included
    index.jsonl           one JSON line per step: step, file, probes, model_type, patterns

This sink is the only writer of the archive; the other sinks ignore `log_archive`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlog.sinks.base import archive_name, check_writable_dir, plugin_dir

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

INDEX = "index.jsonl"


def read_index(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The archived steps of a run, sorted by step; one entry per step (the last one wins).

    A line cut short by a crash is skipped. Open a step with
    `attnlog.snapshot.load(plugin_dir(logdir) / entry["file"])`.
    """
    path = plugin_dir(logdir) / INDEX
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed process
            by_step[int(entry["step"])] = entry
    return [by_step[s] for s in sorted(by_step)]


class ArchiveSink:
    """Writes `step_<8 digits>.npz` and its `index.jsonl` line at every `log_archive`.

    Args:
        logdir: the run's log folder; the archive goes to `<logdir>/plugins/attnlog/`.

    Raises:
        ValueError, PermissionError: `logdir` can never be written (checked before training).
    """

    name = "archive"

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.folder = check_writable_dir(plugin_dir(logdir), "archive folder")
        self.logdir = Path(logdir)
        self._steps: set[int] | None = None  # steps already in the index, read on first use

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        """Save the step's archive, then index it (readers only see indexed, complete files)."""
        name = archive_name(step)
        snapshot.save(self.folder / name, scores=table.scores)
        entry = {
            "step": int(step),
            "file": name,
            "probes": [p.name for p in snapshot.probes],
            "model_type": snapshot.model_type,
            "patterns": sorted(table.scores),
        }
        if self._steps is None:
            self._steps = {e["step"] for e in read_index(self.logdir)}
        if step in self._steps:
            self._rewrite_index(entry)  # a resumed run logs this step again: replace its line
        else:
            self._append_index(entry)
        self._steps.add(int(step))

    def _append_index(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        # One write() on an O_APPEND file: a concurrent reader sees the whole line or none of it.
        fd = os.open(self.folder / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rewrite_index(self, entry: dict[str, Any]) -> None:
        entries = [e for e in read_index(self.logdir) if e["step"] != entry["step"]]
        entries = sorted([*entries, entry], key=lambda e: e["step"])
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        tmp.replace(self.folder / INDEX)

    # The archive holds raw attention only; everything else belongs to the other sinks.
    def log_settings(self, settings: Mapping[str, str]) -> None:
        pass

    def log_scores(self, table: ScoreTable, step: int) -> None:
        pass

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        pass

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        pass

    def log_text(self, texts: Mapping[str, str], step: int) -> None:
        pass

    def flush(self) -> None:
        pass  # every write is complete when log_archive returns

    def close(self) -> None:
        pass
