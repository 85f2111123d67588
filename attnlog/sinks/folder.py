"""FolderSink: an event as plain files a person opens from a file browser.

`attnlog snapshot` writes through it; in training, TensorBoard, MLflow and the archive are the
better homes (this sink keeps no history unless `by_step=True`). Layout:

    <folder>/views.html                                        the event's page of bertviz views
    <folder>/<probe>/{head_view,model_view,neuron_view}.html   per-probe views (`per_probe`)
    <folder>/<probe>/model.png, layer_<l>.png                  heatmaps
    <folder>/patterns/<pattern>.png                            layer x head score matrices
    <folder>/scores.json                                       scores, head labels, alerts

With `by_step=True` every path starts with `step_<8 digits>/`, so events do not overwrite.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from attnlog.sinks.base import Sink, check_writable_dir

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable

__all__ = ["FolderSink"]

_EVENT_PAGE = re.compile(r"step_\d{8}\.html")  # `layout.page_path` without `attention/`


class FolderSink(Sink):
    """Writes images as PNG, HTML views as files and scores as `scores.json` under `folder`.

    Args:
        folder: where the files go (created on the first write).
        by_step: keep each event in its own `step_<8 digits>/` folder instead of overwriting.

    Raises:
        ValueError, PermissionError: `folder` can never be written (checked at construction).

    Attributes:
        written: every file written, in order.
    """

    name = "folder"

    def __init__(self, folder: str | os.PathLike, *, by_step: bool = False) -> None:
        self.folder = check_writable_dir(folder, "output folder")
        self.by_step = by_step
        self.written: list[Path] = []

    def log_scores(self, table: ScoreTable, step: int) -> None:
        text = json.dumps(table.to_json(), ensure_ascii=False, separators=(",", ":"))
        self._write(self._path("scores.json", step), text.encode("utf-8"))

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """`attention/<probe>/model` -> `<probe>/model.png`; `patterns/<p>` -> `patterns/<p>.png`."""
        import io

        import numpy as np
        from PIL import Image

        for tag, image in images.items():
            png = io.BytesIO()
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(png, format="PNG")
            self._write(self._path(tag + ".png", step), png.getvalue())

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        """`attention/step_<8 digits>.html` -> `views.html`;
        `attention/step_<8 digits>/<probe>/head_view.html` -> `<probe>/head_view.html`."""
        for relpath, html in files.items():
            self._write(self._path(relpath, step), html.encode("utf-8"))

    def _path(self, relpath: str, step: int) -> Path:
        """The layout's path without `attention/` and the step folder (one event per folder)."""
        parts = relpath.split("/")
        if parts[0] == "attention":
            parts = parts[1:]
        if len(parts) == 1 and _EVENT_PAGE.fullmatch(parts[0]):
            parts = ["views.html"]
        elif parts and parts[0].startswith("step_"):
            parts = parts[1:]
        if self.by_step:
            parts.insert(0, f"step_{step:08d}")
        return self.folder.joinpath(*parts)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written.append(path)
