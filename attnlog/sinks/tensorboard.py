"""TensorBoard sink: pattern scalars, attention images, alerts and settings as text.

TensorBoard cannot show HTML, so bertviz views are written as files under
`<logdir>/plugins/attnlog/html/<relpath>`, where the attnlog "Attention" tab (and a browser)
opens them. The raw-attention archive belongs to `ArchiveSink`.

A write that fails (a full disk kills TensorBoard's background writer thread, and every later
event would fail with it) drops the writer the sink created: the next event opens a new event
file, so logging resumes once the disk has room again. A shared writer is not ours to rebuild.

TensorBoard keeps only 10 images per tag unless it is started with
`tensorboard --logdir ... --samples_per_plugin images=1000`; the sink says so once per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from attnlog.layout import TB_ALERTS_TAG, TB_SETTINGS_TAG, html_dir
from attnlog.notes import warn_once
from attnlog.sinks.base import Sink, check_writable_dir, pattern_scalars
from attnlog.summary import SummaryTracker

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

__all__ = ["IMAGES_HINT", "TensorBoardSink"]

log = logging.getLogger(__name__)

IMAGES_HINT = (
    "attnlog: TensorBoard shows only 10 images per tag by default; start it with "
    "`tensorboard --logdir <logdir> --samples_per_plugin images=1000` to see every logged step"
)


def _require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ModuleNotFoundError(
            "attnlog's TensorBoard sink needs the `tensorboard` package; install it with "
            "`pip install 'attnlog[tensorboard]'`"
        )


class TensorBoardSink(Sink):
    """Writes to TensorBoard event files, creating the writer on first use.

    Args:
        logdir: folder of the event files (and of the HTML views). May be left out when `writer`
            is given: the writer's own folder is used.
        writer: an existing `SummaryWriter` (e.g. the one of transformers' TensorBoardCallback)
            to share. The sink then only flushes it, never closes it.
        max_image_side: images with a longer side are scaled down to it, so one event stays small.
        images_hint: say once that TensorBoard keeps 10 images per tag (False: the caller says it).

    Raises:
        ModuleNotFoundError: tensorboard is not installed.
        ValueError, PermissionError: `logdir` can never be written (checked before training).
    """

    name = "tensorboard"

    def __init__(
        self,
        logdir: str | os.PathLike | None = None,
        *,
        writer: Any = None,
        max_image_side: int = 4096,
        images_hint: bool = True,
    ) -> None:
        if writer is None:
            _require_tensorboard()
            if logdir is None:
                raise ValueError("TensorBoardSink needs a logdir or a writer")
        elif logdir is None:
            logdir = getattr(writer, "log_dir", None) or writer.get_logdir()
        if max_image_side < 16:
            raise ValueError(f"max_image_side must be at least 16, got {max_image_side}")
        self.logdir = check_writable_dir(logdir, "TensorBoard log folder")
        self.max_image_side = max_image_side
        self.images_hint = images_hint
        self._writer = writer
        self._owns_writer = writer is None
        self._closed = False
        self._summary = SummaryTracker()

    @property
    def writer(self) -> Any:
        """The `SummaryWriter`, created on first use (so an unused sink writes no event file)."""
        if self._closed:
            raise RuntimeError("TensorBoardSink is closed")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            from attnlog.sinks.tensorboard_records import quicken

            self._writer = SummaryWriter(log_dir=str(self.logdir))
            quicken(self._writer)  # TensorBoard's checksums in C: 45 ms of CPU an event less
        return self._writer

    def log_settings(self, settings: Mapping[str, str]) -> None:
        """Settings as one markdown table at step 0 (TensorBoard's Text tab)."""
        rows = "\n".join(f"| {_md(k)} | {_md(v)} |" for k, v in settings.items())
        with self._writing() as writer:
            writer.add_text(TB_SETTINGS_TAG, "| setting | value |\n|---|---|\n" + rows, 0)

    def log_scores(self, table: ScoreTable, step: int) -> None:
        """Per-layer means and the max of every pattern as scalars; alerts as text."""
        with self._writing() as writer:
            for tag, value in pattern_scalars(table).items():
                writer.add_scalar(tag, float(value), step)
            if table.alerts:
                writer.add_text(TB_ALERTS_TAG, "\n\n".join(table.alerts), step)

    def log_event(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        """The run's summary (`attnlog.summary`) as scalars `summary/<name>`."""
        with self._writing() as writer:
            for name, value in self._summary.update(table).metrics().items():
                writer.add_scalar(f"summary/{name}", float(value), step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """`[height, width, 3]` uint8 images under their tags."""
        if self.images_hint and images:
            hint = IMAGES_HINT.replace("<logdir>", str(self.logdir))
            warn_once("tensorboard/images-hint", hint, logger=log)
        fitted = {tag: self._fit(tag, image) for tag, image in images.items()}
        with self._writing() as writer:
            # `file_writer` is a public attribute of torch's (and tensorboardX's) SummaryWriter:
            # one fast PNG encode there; add_image converts to float and back first.
            file_writer = getattr(writer, "file_writer", None)
            for tag, image in fitted.items():
                if hasattr(file_writer, "add_summary"):
                    file_writer.add_summary(_image_summary(tag, image), step)
                else:
                    writer.add_image(tag, image, step, dataformats="HWC")

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        """Writes each view to `<logdir>/plugins/attnlog/html/<relpath>` (TensorBoard has no HTML)."""
        root = html_dir(self.logdir)
        for relpath, html in files.items():
            target = root / _relative(relpath)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(html, encoding="utf-8")
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)

    def flush(self) -> None:
        if self._writer is not None and not self._closed:
            with self._writing() as writer:
                writer.flush()

    def close(self) -> None:
        """Closes the writer it created; a shared writer is only flushed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            if self._owns_writer:
                writer.close()
            else:
                writer.flush()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """The writer; after a failed write an owned writer is dropped, to be rebuilt next time."""
        writer = self.writer
        try:
            yield writer
        except Exception:
            if self._owns_writer and self._writer is writer:
                self._writer = None
                with contextlib.suppress(Exception):
                    writer.close()  # its background thread may be dead already
            raise

    def _fit(self, tag: str, image: np.ndarray) -> np.ndarray:
        import numpy as np

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(
                f"image {tag!r} must be uint8 [height, width, 3], got {image.dtype} {image.shape}"
            )
        if max(image.shape[:2]) <= self.max_image_side:
            return image
        from PIL import Image

        scale = self.max_image_side / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _relative(relpath: str) -> Path:
    """`relpath` as a path inside the HTML folder; absolute paths and `..` are refused."""
    parts = PurePosixPath(relpath.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(f"HTML path {relpath!r} must be relative and stay inside the log folder")
    return Path(*parts)


def _image_summary(tag: str, image: np.ndarray) -> Any:
    """An image summary from uint8 `[height, width, 3]`, as a palette PNG (`render.png`: a
    quarter of the bytes of an RGB PNG, and quicker to encode)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from attnlog.render.png import encode_png

    height, width, channels = image.shape
    encoded = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=encode_png(image)
    )
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])
