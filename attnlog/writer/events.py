"""What a writer does with one event: score it, raise alerts, render it, write it to the sinks.

The same `EventWriter` runs in the writer process and on the thread writer. The training process
hands over the probe pass's host copy; scoring happens here, off the training process.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnlog.sinks.base import OPTIONAL_SINK_METHODS
from attnlog.writer.contain import Containment

if TYPE_CHECKING:
    from attnlog.patterns import ScoreTable
    from attnlog.sinks.base import Sink
    from attnlog.snapshot import Snapshot

__all__ = ["Event", "EventWriter", "WriterConfig"]


@dataclass
class Event:
    """One logging event, as the training process hands it over.

    `snapshot` is the probe pass's host copy (numpy); `table` the scores of pooled long probes,
    made during the pass, or None (probes kept whole): the writer scores them. `page`: whether
    this event also gets its page of views (`views_every`); heatmaps, scores and the archive
    come with every event.
    """

    step: int
    snapshot: Snapshot
    table: ScoreTable | None = None
    page: bool = True


@dataclass
class WriterConfig:
    """What a writer needs to build its sinks and render, sent to the child as its first frame.

    `sinks` are `(name, options)` pairs built with `sink_factory(name)(logdir=..., **options)`;
    `factories` holds user-registered factories (pickled by reference, so their module must be
    importable in the child); `sys_path` lets the child import them.
    """

    sinks: list[tuple[str, dict[str, Any]]]
    logdir: str
    patterns: list[str] | None = None
    views: tuple[str, ...] = ()
    layer_images: bool = False
    alerts: bool = True
    settings: dict[str, str] | None = None  # logged once, with the first event
    strict: bool = False
    factories: bytes = b""  # pickled {name: factory}, loaded once `sys_path` is in place
    sys_path: list[str] = field(default_factory=list)
    environ: dict[str, str] | None = None  # a spare child's environment, as of the first event


class EventWriter:
    """Scores, raises alerts, renders and writes to the sinks, each step contained.

    Every failure is counted in `stats["errors.<stage or sink>"]` and passed once per key to
    `report(key, message)`; with `strict` the first error is kept for `take_failure()` instead.
    """

    def __init__(
        self,
        sinks: Sequence[Sink],
        config: WriterConfig,
        *,
        report: Callable[[str, str], None],
        stats: Counter[str] | None = None,
        on_resume: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.on_resume = on_resume
        self._resume: dict[str, dict[str, Any]] = {}
        self.config = config
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.contained = Containment(self.stats, report, strict=config.strict)
        self._alerts = None
        if config.alerts:
            from attnlog.alerts import AlertTracker

            self._alerts = AlertTracker()
        self._settings = config.settings

    @classmethod
    def from_config(cls, config: WriterConfig, **kwargs: Any) -> EventWriter:
        """Build the named sinks; one that cannot be built is reported and left out."""
        from attnlog.sinks.base import SINKS

        writer = cls([], config, **kwargs)
        if config.factories:
            SINKS.update(writer.contained("registry", pickle.loads, config.factories) or {})
        for name, options in config.sinks:
            sink = writer.contained(name, _build, name, options, config.logdir)
            if sink is not None:
                writer.sinks.append(sink)
        return writer

    def take_failure(self) -> BaseException | None:
        """strict: the first error since the last call."""
        return self.contained.take_failure()

    def write(self, event: Event) -> None:
        step, snapshot, table = event.step, event.snapshot, event.table
        if table is None:  # probes kept whole: scored here, off the training process
            table = self.contained("score", _score, snapshot, self.config.patterns, step)
            if table is None:
                return
        if self._alerts is not None:
            table.alerts = self.contained("alerts", self._alerts.update, table) or []
        if self._settings:
            settings, self._settings = self._settings, None
            self.to_sinks("log_settings", settings)
        self.to_sinks("log_scores", table, step)
        for probe in snapshot.probes:  # one probe's images in memory at a time
            self._write_probe_images(probe, step)
        from attnlog.render.event import event_views, pattern_images

        if self.config.views and event.page:  # else nothing to pool or check against the cap
            files = self.contained("render", event_views, snapshot, step, self.config.views)
            if files:  # one page per event: every probe and view
                self.to_sinks("log_html", files, step)
        images = self.contained("render", pattern_images, table, step)
        if images:
            self.to_sinks("log_images", images, step)
        self.to_sinks("log_event", snapshot, table, step)
        self.to_sinks("log_archive", snapshot, table, step)

    def _write_probe_images(self, probe: Any, step: int) -> None:
        from attnlog.render.event import probe_images

        words = any(view.endswith("_words") for view in self.config.views)
        layers = self.config.layer_images
        images = self.contained("render", probe_images, probe, step, layers=layers, words=words)
        if images:
            self.to_sinks("log_images", images, step)

    def flush(self) -> None:
        self.to_sinks("flush")

    def close(self) -> None:
        self.to_sinks("flush")
        self.to_sinks("close")

    def to_sinks(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            call = getattr(sink, method, None)  # `log_event` is optional in the Sink protocol
            if call is not None or method not in OPTIONAL_SINK_METHODS:
                self.contained(sink.name, call, *args, method=method)
        if self.on_resume is not None:
            resume = self.resume_options()
            if resume != self._resume:
                self._resume = resume
                self.on_resume(resume)

    def resume_options(self) -> dict[str, dict[str, Any]]:
        """Per sink name, the options with which a restarted writer's sink goes on where this
        one is (the MLflow run this writer started): a sink's optional `resume_options()`."""
        out = {}
        for sink in self.sinks:
            resume = getattr(sink, "resume_options", None)  # optional in the Sink protocol
            options = self.contained(sink.name, resume) if resume is not None else None
            if options:
                out[sink.name] = options
        return out


def _build(name: str, options: Mapping[str, Any], logdir: str) -> Sink:
    from attnlog.sinks.base import sink_factory

    return sink_factory(name)(**{"logdir": logdir, **options})


def _score(snapshot: Snapshot, patterns: Sequence[str] | None, step: int) -> ScoreTable:
    import numpy as np

    from attnlog.patterns import score

    return score(snapshot.to_host(np.float32), patterns, step=step)  # the host copy is fp16
