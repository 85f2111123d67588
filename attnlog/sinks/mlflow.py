"""MLflow sink: per-head metrics, image sliders, HTML views and scores.json as artifacts.

Run: an explicit `run_id`, else `MLFLOW_RUN_ID`, else the active run (`mlflow.active_run()` of
the thread that builds the sink), else a run the sink starts (and ends at `close`; it never ends
a run it joined).

An unreachable tracking server never blocks training for long nor loses data: the sink's own
requests fail fast (no retries, `timeout_s`), and each event that could not be sent is written
to a local spool, one JSON file per call (format below). The spool is retried, oldest first, at
a later event (at most every `retry_interval_s`), at `flush()` and at `close()`; `sync()` (the
`attnlog sync` command) sends whatever is left. An entry is deleted only after it was sent, and
its progress is saved part by part, so nothing is sent twice (short of a crash between a send
and that save).

Spool format (`<spool_dir>/<time_ns>-<pid>-<seq>.json`, version 1)::

    {"version": 1, "tracking_uri": "...", "run_id": "..." | null, "experiment_name": ... | null,
     "step": 100,
     "metrics": [[key, value, timestamp_ms, step], ...],
     "params": {key: value}, "tags": {key: value},
     "artifacts": [{"path": "attention/step_00000100/scores.json", "file": "<id>.files/..."}],
     "images": [{"key": "attention/p0/model", "step": 100, "timestamp": ms, "file": "..."}],
     "end_run": "FINISHED" | null}

`run_id` is null while the sink had no run yet (the server was down when it wanted to start
one); the run is filled in, on disk, as soon as one exists. An entry that the server refuses
for good (not a connection problem) is moved to `<spool_dir>/failed/` and the error raised.

Limit: the fast-fail settings are MLflow's `MLFLOW_HTTP_REQUEST_*` environment variables, set
for the duration of the sink's own calls (MLflow reads them per request and has no other
knob); another thread's MLflow calls made at that moment see them too.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlog.sinks.base import (
    check_writable_dir,
    head_metrics,
    plugin_dir,
    scores_path,
    text_path,
)

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

log = logging.getLogger(__name__)

SPOOL_VERSION = 1
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
INSTALL_HINT = "install it with `pip install 'attnlog[mlflow]'`"


def _require_mlflow() -> None:
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError(
            f"attnlog's MLflow sink needs the `mlflow` package; {INSTALL_HINT}"
        )


# ---- keys: the one place that makes names acceptable to MLflow -------------------------------

_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-./ ]")  # what both log_batch and log_image accept


def mlflow_key(text: str) -> str:
    """A metric/param/tag/image key MLflow accepts: safe characters, no `.`/`..` path parts."""
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(text)).split("/") if p.strip()]
    key = "/".join("_" if p in (".", "..") else p for p in parts)
    return key[:MAX_KEY] or "_"


def _artifact_path(relpath: str) -> str:
    path = posixpath.normpath(relpath.replace("\\", "/"))
    if path.startswith(("/", "..")) or path == ".":
        raise ValueError(f"artifact path {relpath!r} must be relative and stay inside the run")
    return path


# ---- fast failure --------------------------------------------------------------------------

_ENV_LOCK = threading.Lock()


@contextmanager
def _fast_http(timeout_s: int) -> Iterator[None]:
    """MLflow HTTP settings for the sink's own calls: no retries, a short timeout."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s)),
    }
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_TRANSIENT_STATUS = {429, 502, 503, 504}


def is_unreachable(exc: BaseException) -> bool:
    """True for errors worth spooling and retrying: connection refused, timeouts, 502-504, 429."""
    import requests
    from mlflow.exceptions import RestException

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(
            exc,
            requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError,
        ):
            return True
        if isinstance(exc, requests.exceptions.RetryError):
            return True
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return exc.response.status_code in _TRANSIENT_STATUS
        if isinstance(exc, RestException) and exc.get_http_status_code() in _TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


# ---- events and the spool -------------------------------------------------------------------


def _event(step: int | None, **parts: Any) -> dict[str, Any]:
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


class Spool:
    """One JSON file per unsent event, artifacts and images copied next to it."""

    _seq = itertools.count()

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def entries(self) -> list[Path]:
        """Pending entries, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("*.json"))

    def add(self, event: dict[str, Any]) -> Path:
        """Write `event` (in-memory texts/arrays become files); return the entry's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry_id = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}"
        files = f"{entry_id}.files"
        record = {k: v for k, v in event.items() if k not in ("artifacts", "images")}
        record["artifacts"] = []
        for art in event["artifacts"]:
            if "file" in art:  # already spooled (a retried entry): keep its file
                record["artifacts"].append(art)
                continue
            rel = f"{files}/artifacts/{art['path']}"
            target = self.folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(art["text"], encoding="utf-8")
            record["artifacts"].append({"path": art["path"], "file": rel})
        record["images"] = []
        for i, img in enumerate(event["images"]):
            if "file" in img:
                record["images"].append(img)
                continue
            from PIL import Image

            rel = f"{files}/images/{i:04d}.png"
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img["array"]).save(self.folder / rel)
            record["images"].append({k: v for k, v in img.items() if k != "array"} | {"file": rel})
        path = self.folder / f"{entry_id}.json"
        self.save(path, record)
        return path

    def load(self, path: Path) -> dict[str, Any]:
        event = json.loads(path.read_text(encoding="utf-8"))
        if event.get("version", 0) > SPOOL_VERSION:
            raise ValueError(f"{path} was written by a newer attnlog; upgrade attnlog to send it")
        return event

    def save(self, path: Path, event: dict[str, Any]) -> None:
        """Atomic rewrite: a reader sees the old or the new entry, never half of one."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(event), encoding="utf-8")
        tmp.replace(path)

    def remove(self, path: Path) -> None:
        path.unlink()  # first: once the entry is gone it can never be sent again
        shutil.rmtree(path.with_name(path.stem + ".files"), ignore_errors=True)

    def set_aside(self, path: Path) -> Path:
        """Move an entry the server refuses for good to `failed/`, so it blocks nothing."""
        failed = self.folder / "failed"
        failed.mkdir(exist_ok=True)
        files = path.with_name(path.stem + ".files")
        if files.exists():
            files.replace(failed / files.name)
        path.replace(failed / path.name)
        return failed / path.name

    def assign_run(self, run_id: str) -> None:
        """Give entries spooled before the run existed their run, on disk, before any send."""
        for path in self.entries():
            event = self.load(path)
            if event.get("run_id") is None:
                event["run_id"] = run_id
                self.save(path, event)


def _send(client: Any, event: dict[str, Any], folder: Path | None, progress: Any) -> None:
    """Send what is left of `event`, dropping each part from it once sent, then `progress()`."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = event["run_id"]
    while event["metrics"]:
        chunk = event["metrics"][:MAX_METRICS_PER_BATCH]
        metrics = [Metric(k, v, ts, s) for k, v, ts, s in chunk]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
        del event["metrics"][: len(chunk)]
        progress()
    for field, make in (("params", Param), ("tags", RunTag)):
        while event[field]:
            keys = list(event[field])[:MAX_PARAMS_TAGS_PER_BATCH]
            entities = [make(k, event[field][k]) for k in keys]
            if field == "params":
                client.log_batch(run_id, params=entities, synchronous=True)
            else:
                client.log_batch(run_id, tags=entities, synchronous=True)
            for k in keys:
                del event[field][k]
            progress()
    while event["artifacts"]:
        art = event["artifacts"][0]
        if "text" in art:
            client.log_text(run_id, art["text"], art["path"])
        else:
            local = folder / art["file"]
            if posixpath.basename(art["path"]) != local.name:
                raise ValueError(f"spool file {local} does not match artifact {art['path']}")
            client.log_artifact(run_id, str(local), posixpath.dirname(art["path"]) or None)
        event["artifacts"].pop(0)
        progress()
    while event["images"]:
        img = event["images"][0]
        if "array" in img:
            image = img["array"]
        else:
            from PIL import Image

            with Image.open(folder / img["file"]) as opened:
                image = opened.convert("RGB")
        client.log_image(
            run_id, image, key=img["key"], step=img["step"], timestamp=img["timestamp"],
            synchronous=True,
        )  # fmt: skip
        event["images"].pop(0)
        progress()
    if event.get("end_run"):
        client.set_terminated(run_id, event["end_run"])
        event["end_run"] = None
        progress()


# ---- the sink -------------------------------------------------------------------------------


class MLflowSink:
    """Logs to an MLflow run; spools locally while the tracking server is unreachable.

    Args:
        tracking_uri: defaults to `mlflow.get_tracking_uri()` (`MLFLOW_TRACKING_URI`).
        run_id: the run to log to; see the module docstring for how a run is chosen otherwise.
        experiment_name: for a run the sink starts; defaults to `MLFLOW_EXPERIMENT_NAME`, then
            `MLFLOW_EXPERIMENT_ID`, then MLflow's default experiment.
        logdir: the run's log folder; the spool defaults to `<logdir>/plugins/attnlog/mlflow_spool`.
        spool_dir: where unsent events wait (default as above, or `./attnlog_mlflow_spool`).
        timeout_s: HTTP timeout of the sink's requests (no retries: the spool retries).
        retry_interval_s: after a failure, later events go straight to the spool for this long
            instead of waiting on the server again; `flush()`/`close()` always retry.

    Raises:
        ModuleNotFoundError: mlflow is not installed.
        ValueError, PermissionError: the spool folder can never be written.
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        run_id: str | None = None,
        experiment_name: str | None = None,
        logdir: str | os.PathLike | None = None,
        spool_dir: str | os.PathLike | None = None,
        timeout_s: int = 5,
        retry_interval_s: float = 30.0,
    ) -> None:
        _require_mlflow()
        import mlflow
        from mlflow import MlflowClient

        default_uri = mlflow.get_tracking_uri()
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
        self._client = MlflowClient(self.tracking_uri)
        self._owns_run = run_id is None  # the sink starts the run itself, so it ends it
        self._alerts: int | None = None  # alerts tagged so far in this run
        self._retry_at = 0.0  # monotonic time before which events go straight to the spool
        self._outage: str | None = None  # the cause of the current outage, reported once
        self._closed = False

    # -- protocol --------------------------------------------------------------------------

    def log_settings(self, settings: Mapping[str, str]) -> None:
        """Settings as params `attnlog.<key>` (prefixed: Trainer logs its own arguments)."""
        params = {mlflow_key(f"attnlog.{k}"): str(v)[:MAX_PARAM_VALUE] for k, v in settings.items()}
        self._submit(_event(None, params=params))

    def log_scores(self, table: ScoreTable, step: int) -> None:
        """Per-head metrics and layer means, `scores.json`, and alerts as `attnlog.alert.<n>` tags."""
        now = _now_ms()
        metrics = [[mlflow_key(k), v, now, step] for k, v in head_metrics(table).items()]
        text = json.dumps(table.to_json())
        artifacts = [{"path": scores_path(step), "text": text}]
        tags = {}
        if table.alerts:
            first = self._alert_count()
            for n, alert in enumerate(table.alerts, start=first):
                tags[f"attnlog.alert.{n}"] = str(alert)[:MAX_TAG_VALUE]
            self._alerts = first + len(table.alerts)
        self._submit(_event(step, metrics=metrics, artifacts=artifacts, tags=tags))

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        now = _now_ms()
        metrics = [[mlflow_key(k), float(v), now, step] for k, v in scalars.items()]
        self._submit(_event(step, metrics=metrics))

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Each image with `key=<tag>` and `step`, so the MLflow UI shows a step slider."""
        import numpy as np

        now = _now_ms()
        entries = []
        for tag, image in images.items():
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
                raise ValueError(
                    f"image {tag!r} must be uint8 [height, width, 3], got {array.shape}"
                )
            entries.append({"key": mlflow_key(tag), "step": step, "timestamp": now, "array": array})
        self._submit(_event(step, images=entries))

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        """Views as artifacts at their `html_path`."""
        arts = [{"path": _artifact_path(p), "text": html} for p, html in files.items()]
        self._submit(_event(step, artifacts=arts))

    def log_text(self, texts: Mapping[str, str], step: int) -> None:
        """Texts as markdown artifacts at `text_path(step, tag)`."""
        arts = [{"path": text_path(step, tag), "text": text} for tag, text in texts.items()]
        self._submit(_event(step, artifacts=arts))

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        pass  # ArchiveSink owns the archive; scores.json goes with log_scores.

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
            with _fast_http(self.timeout_s):
                event["run_id"] = self._ensure_run()
                _send(self._client, event, None, lambda: None)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._down(exc)
            self.spool.add(event)  # what is left of it: sent parts were dropped
        else:
            self._up()

    def _drain(self, force: bool) -> bool:
        """Send spooled entries, oldest first; True when the spool is empty afterwards."""
        paths = self.spool.entries()
        if not paths:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        sent = 0
        for path in paths:
            try:
                with _fast_http(self.timeout_s):
                    self._ensure_run()
                    event = self.spool.load(path)  # reloaded: _ensure_run may assign its run
                    event["run_id"] = event["run_id"] or self.run_id
                    save = functools.partial(self.spool.save, path, event)
                    _send(self._client, event, self.spool.folder, save)
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
        log.info("attnlog: sent %d spooled MLflow events to %s", sent, self.tracking_uri)
        self._up()
        return True

    def _ensure_run(self) -> str:
        if self.run_id is None:
            self.run_id = _start_run(self._client, self.experiment_name)
            self._alerts = 0
            self.spool.assign_run(self.run_id)
        return self.run_id

    def _alert_count(self) -> int:
        """Alerts already tagged in the run (a resumed run goes on numbering, not overwriting)."""
        if self._alerts is None:
            self._alerts = 0
            if self.run_id is not None:
                try:
                    with _fast_http(self.timeout_s):
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
            return f"`attnlog sync {folder.parents[2]}`"  # the CLI takes the logdir
        return f"`attnlog.sinks.mlflow.sync({str(folder)!r})`"

    def _up(self) -> None:
        self._retry_at = 0.0
        self._outage = None


def _start_run(client: Any, experiment_name: str | None) -> str:
    if experiment_name:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        )
    else:
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"
    run = client.create_run(experiment_id, tags={"mlflow.source.name": "attnlog"})
    return run.info.run_id


def _now_ms() -> int:
    return int(time.time() * 1000)


def default_spool_dir(logdir: str | os.PathLike) -> Path:
    """Where a run's unsent MLflow events wait: `<logdir>/plugins/attnlog/mlflow_spool`."""
    return plugin_dir(logdir) / "mlflow_spool"


def sync(spool_dir: str | os.PathLike, tracking_uri: str | None = None, timeout_s: int = 30) -> int:
    """Send the events left in a spool (the `attnlog sync` command); returns how many were sent.

    Each entry goes to its own run on its own server (`tracking_uri` overrides the server).
    Entries that never had a run get one new run, recorded in them before anything is sent, so
    an interrupted sync can simply be run again.

    Raises:
        ConnectionError: the server is unreachable; the entries not sent stay in the spool.
        RuntimeError: the server refused an entry for good; it is moved to `failed/`.
    """
    _require_mlflow()
    from mlflow import MlflowClient

    spool = Spool(Path(spool_dir))
    sent = 0
    for path in spool.entries():
        if not path.exists():
            continue
        event = spool.load(path)
        uri = tracking_uri or event.get("tracking_uri")
        client = MlflowClient(uri)
        try:
            with _fast_http(timeout_s):
                if event.get("run_id") is None:
                    spool.assign_run(_start_run(client, event.get("experiment_name")))
                    event = spool.load(path)
                _send(client, event, spool.folder, functools.partial(spool.save, path, event))
        except Exception as exc:
            if is_unreachable(exc):
                left = len(spool.entries())
                raise ConnectionError(
                    f"MLflow at {uri} is unreachable; sent {sent}, {left} events left in "
                    f"{spool.folder}: {exc}"
                ) from exc
            moved = spool.set_aside(path)
            raise RuntimeError(f"MLflow refused {path.name}; moved to {moved}: {exc}") from exc
        spool.remove(path)
        sent += 1
    return sent
