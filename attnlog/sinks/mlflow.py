"""MLflow sink: layer-mean and summary metrics, image cards, the event's page and scores.json.

Run: an explicit `run_id`, else `MLFLOW_RUN_ID`, else the active run (`mlflow.active_run()` of
the thread that builds the sink), else a run the sink starts (and ends at `close`; it never ends
a run it joined).

An unreachable tracking server never blocks training for long nor loses data: the sink's own
requests fail fast (no retries, `timeout_s`), and each event that could not be sent goes to the
local spool (`attnlog.sinks.spool`), retried oldest first at a later event (at most every
`retry_interval_s`), at `flush()` and at `close()`; `attnlog sync` sends whatever is left.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from attnlog.layout import clean_key, default_spool_dir, scores_path
from attnlog.sinks.base import Sink, check_writable_dir, head_metrics
from attnlog.sinks.spool import (
    CorruptEntry,
    Spool,
    fast_http,
    is_unreachable,
    mark_experiment,
    require_mlflow,
    send,
    start_run,
    ui_url,
)
from attnlog.sinks.spool_guard import SpoolBusy, hold
from attnlog.summary import SummaryTracker, describe_change

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

__all__ = ["MLflowSink", "default_spool_dir", "mlflow_key"]

log = logging.getLogger(__name__)


def mlflow_key(text: str) -> str:
    """A metric/param/tag/image key MLflow accepts (`layout.clean_key` at MLflow's length)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    return clean_key(text, MAX_ENTITY_KEY_LENGTH)


def _artifact_path(relpath: str) -> str:
    path = posixpath.normpath(relpath.replace("\\", "/"))
    if path.startswith(("/", "..")) or path == ".":
        raise ValueError(f"artifact path {relpath!r} must be relative and stay inside the run")
    return path


def _event(step: int | None, **parts: Any) -> dict[str, Any]:
    from attnlog.sinks.spool import SPOOL_VERSION

    event: dict[str, Any] = {
        "version": SPOOL_VERSION,
        "run_id": None,
        "step": step,
        "metrics": [],
        "params": {},
        "tags": {},
        "artifacts": [],
        "images": [],
        "end_run": None,
    }
    event.update(parts)
    return event


# ---- the sink -------------------------------------------------------------------------------


class MLflowSink(Sink):
    """Logs to an MLflow run; spools locally while the tracking server is unreachable.

    Args:
        tracking_uri: defaults to the client's, else `mlflow.get_tracking_uri()`
            (`MLFLOW_TRACKING_URI`).
        client: an `MlflowClient` to use (as `TensorBoardSink` takes a writer); its tracking URI
            is the sink's.
        run_id: the run to log to; see the module docstring for how a run is chosen otherwise.
        experiment_name: for a run the sink starts; defaults to `MLFLOW_EXPERIMENT_NAME`, then
            `MLFLOW_EXPERIMENT_ID`, then MLflow's default experiment. Experiments get MLflow's
            model-training view (`spool.EXPERIMENT_KIND_TAG`) unless they have a kind already.
        logdir: the run's log folder; the spool defaults to `<logdir>/plugins/attnlog/mlflow_spool`.
        spool_dir: where unsent events wait (default as above, or `./attnlog_mlflow_spool`).
        timeout_s: HTTP timeout of the sink's requests (no retries: the spool retries).
        retry_interval_s: after a failure, later events go straight to the spool for this long
            instead of waiting on the server again; `flush()`/`close()` always retry.
        cards: draw the probes' overviews for MLflow's image cards
            (`attnlog.render.mlflow_cards`, at `log_event`) instead of logging TensorBoard's
            renders of them; other images are logged as given.
        head_metrics: a metric per head, `attn.<pattern>.L<l>H<h>` (about 1,400 an event on a
            6 x 12 model), besides the layer means `attn.<pattern>.L<l>` and the summary. Off by
            default: they were half of MLflow's store, a fifth of the writer's CPU, and a metric
            picker nobody could use; every head's scores are in `scores.json` (which
            `attnlog compare` reads), TensorBoard and the archive.
        pattern_cards: with `cards`, also a card per pattern (its `[L, H]` scores). Off by
            default: 18 more images an event, a third of the writer's CPU, for scores that the
            metrics and TensorBoard's `patterns/<pattern>` images already show.
        end_run: end the run at `close` (default: only a run the sink starts). A restarted
            writer process passes `run_id` and `end_run=True` to go on with the run it started.

    Raises:
        ModuleNotFoundError: mlflow is not installed.
        ValueError, PermissionError: the spool folder can never be written.
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        client: Any = None,
        run_id: str | None = None,
        experiment_name: str | None = None,
        logdir: str | os.PathLike | None = None,
        spool_dir: str | os.PathLike | None = None,
        timeout_s: int = 5,
        retry_interval_s: float = 30.0,
        cards: bool = False,
        head_metrics: bool = False,
        pattern_cards: bool = False,
        end_run: bool | None = None,
    ) -> None:
        require_mlflow()
        import mlflow
        from mlflow import MlflowClient

        default_uri = mlflow.get_tracking_uri()
        if client is not None and tracking_uri is None:
            tracking_uri = client.tracking_uri
        self.tracking_uri = str(tracking_uri or default_uri)
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        if run_id is None and self.tracking_uri == default_uri:
            active = mlflow.active_run()  # thread-local: read here, in the user's thread
            run_id = active.info.run_id if active else None
        self.run_id: str | None = run_id
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if spool_dir is None:
            spool_dir = default_spool_dir(logdir) if logdir else "attnlog_mlflow_spool"
        self.spool = Spool(check_writable_dir(spool_dir, "MLflow spool folder"))
        if int(timeout_s) < 1:
            raise ValueError(f"timeout_s must be at least 1 second, got {timeout_s}")
        self.timeout_s = int(timeout_s)
        self.retry_interval_s = retry_interval_s
        self._client = client if client is not None else MlflowClient(self.tracking_uri)
        self._owns_run = run_id is None if end_run is None else end_run  # it ends the run
        self._marked = False  # the run's experiment has its kind tag (checked once)
        self._alerts: int | None = None  # alerts tagged so far in this run
        self._retry_at = 0.0  # monotonic time before which events go straight to the spool
        self._outage: str | None = None  # the cause of the current outage, reported once
        self._closed = False
        self.cards = bool(cards)
        self.pattern_cards = bool(pattern_cards)
        self.head_metrics = bool(head_metrics)
        self._summary = SummaryTracker()

    # -- Sink ------------------------------------------------------------------------------

    def log_settings(self, settings: Mapping[str, str]) -> None:
        """Settings as params `attnlog.<key>` (prefixed: Trainer logs its own arguments)."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = {
            mlflow_key(f"attnlog.{k}"): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in settings.items()
        }
        self._submit(_event(None, params=params))

    def log_scores(self, table: ScoreTable, step: int) -> None:
        """Layer means (and per-head metrics with `head_metrics`), `scores.json` with every head,
        and alerts as `attnlog.alert.<n>` tags, in one event (one `log_batch` for up to 1000
        metrics, params and tags)."""
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        now = _now_ms()
        metrics = [
            [mlflow_key(k), v, now, step] for k, v in head_metrics(table, self.head_metrics).items()
        ]
        text = json.dumps(table.to_json(), separators=(",", ":"))  # 10 % smaller than ", "
        artifacts = [{"path": scores_path(step), "text": text}]
        tags = {}
        if table.alerts:
            first = self._alert_count()
            for n, alert in enumerate(table.alerts, start=first):
                tags[f"attnlog.alert.{n}"] = str(alert)[:MAX_TAG_VAL_LENGTH]
            self._alerts = first + len(table.alerts)
        self._submit(_event(step, metrics=metrics, artifacts=artifacts, tags=tags))

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Each image with `key=<tag>` and `step`, so the MLflow UI shows a step slider."""
        import numpy as np

        from attnlog.render.mlflow_cards import covered

        now = _now_ms()
        entries = []
        for tag, image in images.items():
            if self.cards and covered(tag):
                continue  # its card comes with `log_event`
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
                raise ValueError(
                    f"image {tag!r} must be uint8 [height, width, 3], got {array.shape}"
                )
            entries.append({"key": mlflow_key(tag), "step": step, "timestamp": now, "array": array})
        if entries:
            self._submit(_event(step, images=entries))

    def log_event(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        """Summary metrics `attn.summary.*` (`attnlog.summary`) and the heads they point at as
        tags, with the image cards when `cards` is on: one event."""
        from attnlog.render.mlflow_cards import render_cards

        summary = self._summary.update(table)
        now = _now_ms()
        metrics = [
            [mlflow_key(f"attn.summary.{k}"), v, now, step] for k, v in summary.metrics().items()
        ]
        tops = ", ".join(f"{p} {h}" for p, h in summary.top_head.items())
        tags = {
            "attnlog.summary.most_changed": describe_change(summary.most_changed),
            "attnlog.summary.top_heads": tops,
        }
        cards = render_cards(snapshot, table, self.pattern_cards) if self.cards else {}
        images = [
            {"key": mlflow_key(tag), "step": step, "timestamp": now, "array": image}
            for tag, image in cards.items()
        ]
        self._submit(_event(step, metrics=metrics, tags=tags, images=images))

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        """Views as artifacts at their `html_path`."""
        arts = [{"path": _artifact_path(p), "text": html} for p, html in files.items()]
        self._submit(_event(step, artifacts=arts))

    def flush(self) -> None:
        """Retry the spool now. An unreachable server is reported, not raised."""
        if not self._closed:
            self._drain(force=True)

    def close(self) -> None:
        """Flush, then end the run if this sink started it. Safe to call twice."""
        if self._closed:
            return
        if self._owns_run and (self.run_id is not None or self.spool.entries()):
            # Spooled too when the server is down: sync() then ends the run it sends to.
            self._submit(_event(None, end_run="FINISHED"), force=True)
        else:
            self._drain(force=True)
        self._closed = True
        if self.spool.entries():
            log.warning(
                "attnlog: %d MLflow events are still in %s; send them with %s",
                len(self.spool.entries()), self.spool.folder, self._sync_hint(),
            )  # fmt: skip

    def resume_options(self) -> dict[str, Any]:
        """What a sink built after this one (a restarted writer process) needs to go on with
        this sink's run, and to end it if this sink would have."""
        if self.run_id is None:
            return {}
        return {"run_id": self.run_id, "end_run": self._owns_run}

    # -- delivery --------------------------------------------------------------------------

    def _submit(self, event: dict[str, Any], force: bool = False) -> None:
        if self._closed:
            raise RuntimeError("MLflowSink is closed")
        event["tracking_uri"] = self.tracking_uri
        event["experiment_name"] = self.experiment_name
        event["run_id"] = self.run_id
        try:
            ready = self._drain(force=force)
        except Exception:
            self.spool.add(event)  # a refused old entry must not cost this event
            raise
        if not ready:
            self.spool.add(event)  # keep order: older events are still waiting
            return
        try:
            with fast_http(self.timeout_s):
                event["run_id"] = self._ensure_run()
                send(self._client, event, None, lambda: None)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._down(exc)
            self.spool.add(event)  # what is left of it: sent parts were dropped
        else:
            self._up()

    def _drain(self, force: bool) -> bool:
        """Send spooled entries, oldest first; True when the spool is empty afterwards.

        A damaged entry is set aside with a warning and the rest is sent; an entry the server
        refuses is set aside and raised (the logger reports it once).
        """
        paths = self.spool.entries()
        if not paths:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            with hold(self.spool.folder):  # never beside an `attnlog sync` of the same spool
                return self._send_spooled(paths)
        except SpoolBusy:
            return False  # the other sender has them; later events go to the spool meanwhile

    def _send_spooled(self, paths: list) -> bool:
        sent = 0
        for path in paths:
            if not path.exists():
                continue  # set aside by assign_run
            try:
                with fast_http(self.timeout_s):
                    self._ensure_run()
                    if not path.exists():
                        continue
                    event = self.spool.load(path)  # reloaded: _ensure_run may assign its run
                    event["run_id"] = event["run_id"] or self.run_id
                    save = functools.partial(self.spool.save, path, event)
                    send(self._client, event, self.spool.folder, save)
            except CorruptEntry as exc:
                self.spool.set_aside(path, exc)
                continue
            except Exception as exc:
                if is_unreachable(exc):
                    self._down(exc)
                    return False
                moved = self.spool.set_aside(path)
                raise RuntimeError(
                    f"MLflow refused spooled event {path.name}; moved to {moved}: {exc}"
                ) from exc
            self.spool.remove(path)
            sent += 1
        if sent:
            log.info("attnlog: sent %d spooled MLflow events to %s", sent, self.tracking_uri)
        self._up()
        return True

    def _ensure_run(self) -> str:
        if self.run_id is None:
            self.run_id = start_run(self._client, self.experiment_name)
            self._alerts = 0
            self.spool.assign_run(self.run_id)
        if not self._marked:
            self._marked = True  # once per sink: say where the run is, in the training view
            try:
                experiment_id = self._client.get_run(self.run_id).info.experiment_id
                mark_experiment(self._client, experiment_id)  # a joined run's (the Trainer's)
                url = ui_url(self.tracking_uri, experiment_id, self.run_id)
                log.info("attnlog: logging to MLflow run %s", url)
            except Exception as exc:  # a view preference is not worth losing an event for
                log.debug("attnlog: could not tag the MLflow experiment's kind: %s", exc)
        return self.run_id

    def _alert_count(self) -> int:
        """Alerts already tagged in the run (a resumed run goes on numbering, not overwriting)."""
        if self._alerts is None:
            self._alerts = 0
            if self.run_id is not None:
                try:
                    with fast_http(self.timeout_s):
                        tags = self._client.get_run(self.run_id).data.tags
                    self._alerts = sum(k.startswith("attnlog.alert.") for k in tags)
                except Exception as exc:
                    if not is_unreachable(exc):
                        raise
                    self._alerts = None  # unknown: ask again next time, start at 0 now
                    return 0
        return self._alerts

    def _down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_interval_s
        if self._outage is None:
            self._outage = str(exc).splitlines()[0][:300]
            log.warning(
                "attnlog: MLflow at %s is unreachable (%s); events go to %s and are sent when "
                "it is back (or with %s)",
                self.tracking_uri, self._outage, self.spool.folder, self._sync_hint(),
            )  # fmt: skip

    def _sync_hint(self) -> str:
        folder = self.spool.folder
        if folder.parts[-3:] == ("plugins", "attnlog", "mlflow_spool"):
            return f"`attnlog sync {folder.parents[2]} --tracking-uri {self.tracking_uri}`"
        return f"`attnlog.sinks.spool.sync({str(folder)!r}, {self.tracking_uri!r})`"

    def _up(self) -> None:
        self._retry_at = 0.0
        self._outage = None


def _now_ms() -> int:
    return int(time.time() * 1000)
