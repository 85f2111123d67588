"""The MLflow spool: events the tracking server did not take yet, and `sync` to send them later.

The MLflow sink writes here while the server is unreachable; the sink itself (at a later event,
`flush`, `close`) or `attnlog sync <logdir>` sends the entries, oldest first. An entry is deleted
only after it was sent, and its progress is saved part by part, so nothing is sent twice (short
of a crash between a send and that save).

Format (`<spool_dir>/<time_ns>-<pid>-<seq>.json`, version 1)::

    {"version": 1, "tracking_uri": "...", "run_id": "..." | null, "experiment_name": ... | null,
     "step": 100,
     "metrics": [[key, value, timestamp_ms, step], ...],
     "params": {key: value}, "tags": {key: value},
     "artifacts": [{"path": "attention/step_00000100/scores.json", "file": "<id>.files/..."}],
     "images": [{"key": "attention/p0/model", "step": 100, "timestamp": ms, "file": "..."}],
     "end_run": "FINISHED" | null}

`run_id` is null while the sink had no run yet (the server was down when it wanted to start one);
every entry gets the run, on disk, as soon as one exists, so one training run stays one MLflow run.

Damage is contained to the entry it hits: an entry that cannot be read (not UTF-8, not JSON, a
field of the wrong type) or that the server refuses for good is moved to `<spool_dir>/failed/`
with a message, and the other entries are still sent, to the same run.

A spool folder may be shared, so its entries are not trusted (`spool_guard`): an entry may send
only the files spooled with it, and one naming any other file is refused and set aside. `sync`
sends to the server its caller names, never to one an entry names, and one `sync` at a time
holds the spool.

Limit: the fast-fail settings are MLflow's `MLFLOW_HTTP_REQUEST_*` environment variables, set
for the duration of attnlog's own calls (MLflow reads them per request and has no other knob);
another thread's MLflow calls made at that moment see them too.
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
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlog.files import NotARegularFile, open_regular, read_regular
from attnlog.layout import default_spool_dir
from attnlog.sinks.spool_guard import (
    CorruptEntry,
    RefusedEntry,
    SpoolBusy,
    check_entry_files,
    hold,
    spooled_file,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "experiment_id",
    "SPOOL_VERSION",
    "CorruptEntry",
    "RefusedEntry",
    "Spool",
    "SpoolBusy",
    "default_spool_dir",
    "fast_http",
    "is_unreachable",
    "send",
    "start_run",
    "sync",
    "ui_url",
]

log = logging.getLogger(__name__)

SPOOL_VERSION = 1
INSTALL_HINT = "install it with `pip install 'attnlog[mlflow]'`"
# MLflow 3 opens an experiment on its GenAI overview; attnlog logs training runs, so it asks for
# the model-training view: the experiment-kind tag (tag and value as in MLflow's own UI code) for
# UIs that read it, and `workflowType=machine_learning` in the links it prints, which the 3.17
# UI follows instead (it keeps the last view chosen, GenAI by default, and ignores the tag).
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI link of an experiment (or run) that opens in the model-training view.

    For a local store (sqlite, files) the link is to `mlflow ui`'s default address.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base or DEFAULT_UI}/{path}?workflowType=machine_learning"


# field -> type of a readable entry
_FIELDS = {"metrics": list, "params": dict, "tags": dict, "artifacts": list, "images": list}


def require_mlflow(what: str = "attnlog's MLflow sink") -> None:
    """ModuleNotFoundError with the install command when mlflow is missing (nothing imported)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError(f"{what} needs the `mlflow` package; {INSTALL_HINT}")


# ---- fast failure ---------------------------------------------------------------------------

_ENV_LOCK = threading.Lock()


@contextmanager
def fast_http(timeout_s: int) -> Iterator[None]:
    """MLflow HTTP settings for attnlog's own calls: no retries, a short timeout."""
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


# ---- the spool ------------------------------------------------------------------------------


class Spool:
    """One JSON file per unsent event, artifacts and images copied next to it."""

    _seq = itertools.count()

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

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
            rel = f"{files}/artifacts/{art['path']}"
            target = self.folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if "file" in art:  # already spooled (a retried entry): its file, into this entry's
                shutil.copyfile(spooled_file(self.folder, art["file"]), target)
            else:
                target.write_text(art["text"], encoding="utf-8")
            record["artifacts"].append({"path": art["path"], "file": rel})
        record["images"] = []
        for i, img in enumerate(event["images"]):
            rel = f"{files}/images/{i:04d}.png"
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if "file" in img:  # already spooled (a retried entry)
                shutil.copyfile(spooled_file(self.folder, img["file"]), self.folder / rel)
            else:
                from PIL import Image

                image = img["array"]  # an array, or a card already in palette form
                image = image if isinstance(image, Image.Image) else Image.fromarray(image)
                image.save(self.folder / rel)
            kept = {k: v for k, v in img.items() if k not in ("array", "file")}
            record["images"].append(kept | {"file": rel})
        path = self.folder / f"{entry_id}.json"
        self.save(path, record)
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """One entry.

        Raises:
            CorruptEntry: the file is not a readable entry (set it aside with `set_aside`).
            RefusedEntry: it names a file outside its own folder (set it aside too).
            ValueError: a newer attnlog wrote it (kept: upgrade attnlog to send it).
        """
        try:
            event = json.loads(read_regular(path).decode("utf-8"))
        except NotARegularFile as exc:
            raise CorruptEntry(str(exc)) from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptEntry(f"{path.name} is not valid JSON ({exc})") from None
        if not isinstance(event, dict):
            raise CorruptEntry(f"{path.name} holds {type(event).__name__}, not an entry")
        version = event.get("version", 0)
        if not isinstance(version, int):
            raise CorruptEntry(f"{path.name} has no valid version")
        if version > SPOOL_VERSION:
            raise ValueError(f"{path} was written by a newer attnlog; upgrade attnlog to send it")
        for name, kind in _FIELDS.items():
            event.setdefault(name, kind())
            if not isinstance(event[name], kind):
                raise CorruptEntry(f"{path.name}: {name!r} is not a {kind.__name__}")
        check_entry_files(path, event)
        return event

    def servers(self) -> Counter[str]:
        """How many readable entries name each tracking URI (what `sync` reports, never uses)."""
        found: Counter[str] = Counter()
        for path in self.entries():
            try:
                uri = self.load(path).get("tracking_uri")
            except (ValueError, OSError):
                continue
            if isinstance(uri, str) and uri:
                found[uri] += 1
        return found

    def save(self, path: Path, event: dict[str, Any]) -> None:
        """Atomic rewrite: a reader sees the old or the new entry, never half of one."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(event), encoding="utf-8")
        tmp.replace(path)

    def remove(self, path: Path) -> None:
        path.unlink()  # first: once the entry is gone it can never be sent again
        shutil.rmtree(path.with_name(path.stem + ".files"), ignore_errors=True)

    def set_aside(self, path: Path, reason: object = None) -> Path:
        """Move an entry that can never be sent to `failed/`, so it blocks nothing; say so."""
        failed = self.folder / "failed"
        failed.mkdir(exist_ok=True)
        files = path.with_name(path.stem + ".files")
        if files.exists():
            files.replace(failed / files.name)
        path.replace(failed / path.name)
        if reason is not None:
            log.warning("attnlog: MLflow spool entry %s moved to %s: %s", path.name, failed, reason)
        return failed / path.name

    def assign_run(self, run_id: str) -> list[Path]:
        """Give entries spooled before the run existed their run, on disk, before any send.

        Each entry is read on its own: a damaged one is set aside (and returned) and the others
        still get the run, so one damaged file cannot split the run in two.
        """
        set_aside = []
        for path in self.entries():
            try:
                event = self.load(path)
            except CorruptEntry as exc:
                set_aside.append(self.set_aside(path, exc))
                continue
            if event.get("run_id") is None:
                event["run_id"] = run_id
                self.save(path, event)
        return set_aside


# ---- sending --------------------------------------------------------------------------------


def send(
    client: MlflowClient, event: dict[str, Any], folder: Path | None, progress: Callable[[], None]
) -> None:
    """Send what is left of `event`, dropping each part from it once sent, then `progress()`.

    Order: metrics, params and tags (together in `log_batch` calls within MLflow's limits),
    artifacts, images, the end of the run.
    """
    _send_batches(client, event, progress)
    _send_artifacts(client, event, folder, progress)
    _send_images(client, event, folder, progress)
    if event.get("end_run"):
        client.set_terminated(event["run_id"], event["end_run"])
        event["end_run"] = None
        progress()


def _send_batches(
    client: MlflowClient, event: dict[str, Any], progress: Callable[[], None]
) -> None:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils import validation

    while event["metrics"] or event["params"] or event["tags"]:
        params = list(event["params"])[: validation.MAX_PARAMS_TAGS_PER_BATCH]
        tags = list(event["tags"])[: validation.MAX_PARAMS_TAGS_PER_BATCH - len(params)]
        room = validation.MAX_ENTITIES_PER_BATCH - len(params) - len(tags)
        metrics = event["metrics"][: min(validation.MAX_METRICS_PER_BATCH, room)]
        client.log_batch(
            event["run_id"],
            metrics=[Metric(k, v, ts, s) for k, v, ts, s in metrics],
            params=[Param(k, event["params"][k]) for k in params],
            tags=[RunTag(k, event["tags"][k]) for k in tags],
            synchronous=True,
        )
        del event["metrics"][: len(metrics)]
        for k in params:
            del event["params"][k]
        for k in tags:
            del event["tags"][k]
        progress()


def _send_artifacts(
    client: MlflowClient, event: dict[str, Any], folder: Path | None, progress: Callable[[], None]
) -> None:
    while event["artifacts"]:
        art = event["artifacts"][0]
        if "text" in art:
            client.log_text(event["run_id"], art["text"], art["path"])
        else:
            local = spooled_file(folder, art["file"])  # named as `art["path"]`: check_entry_files
            client.log_artifact(event["run_id"], str(local), posixpath.dirname(art["path"]) or None)
        event["artifacts"].pop(0)
        progress()


def _send_images(
    client: MlflowClient, event: dict[str, Any], folder: Path | None, progress: Callable[[], None]
) -> None:
    """Every image of the event in one `log_artifacts` call, named and made as
    `MlflowClient.log_image(key=, step=)` names and makes them (`image_stem`): the image as a
    PNG, and its 256 px thumbnail `...+compressed.webp`, which the "Model metrics" cards show.

    `log_image` took 8 ms a card: two `log_artifact` calls and a `set_tag` each. Each image's
    name holds its own id, so an event sent again overwrites what it sent before.
    """
    if not event["images"]:
        return
    import tempfile

    from attnlog.render.png import save_png, save_thumbnail

    with tempfile.TemporaryDirectory(prefix="attnlog-images-") as tmp:
        for img in event["images"]:
            stem = str(Path(tmp, image_stem(img)))
            image = img["array"] if "array" in img else _spooled_image(folder, img["file"])
            save_png(image, stem + ".png")
            save_thumbnail(image, stem + "+compressed.webp", THUMBNAIL_PX)
        client.set_tag(event["run_id"], LOGGED_IMAGES_TAG, True)  # the UI then looks for them
        client.log_artifacts(event["run_id"], tmp, "images")
    event["images"] = []
    progress()


LOGGED_IMAGES_TAG = "mlflow.loggedImages"  # set by `MlflowClient.log_image` too
THUMBNAIL_PX = 256  # the side of `log_image`'s thumbnails
_IMAGE_KEY = re.compile(r"[a-zA-Z0-9_\-./ ]+")  # the keys `log_image` takes
_IMAGE_ID = re.compile(r"[0-9a-f-]{1,64}")


def image_stem(img: dict[str, Any]) -> str:
    """`<key, "/" as "~">+step+<step>+timestamp+<ms>+<id>`: how MLflow names a `log_image`
    artifact under `images/`, and how its UI finds an image's key and step. An image with no
    id (or a planted one) gets a new one.

    Raises:
        ValueError: the key is one `log_image` refuses too.
    """
    key, step, timestamp = img["key"], int(img["step"]), int(img["timestamp"])
    if not (isinstance(key, str) and _IMAGE_KEY.fullmatch(key)):
        raise ValueError(f"image key {str(key)[:200]!r} may only hold letters, digits, _-./ ")
    if not (isinstance(img.get("id"), str) and _IMAGE_ID.fullmatch(img["id"])):
        img["id"] = str(uuid.uuid4())
    return f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+{img['id']}"


def _spooled_image(folder: Path | None, name: str) -> Any:
    from PIL import Image

    with open_regular(spooled_file(folder, name)) as fh, Image.open(fh) as opened:
        return opened.convert("P" if opened.mode == "P" else "RGB")  # loaded before it closes


def experiment_id(client: MlflowClient, experiment_name: str) -> str:
    """The id of `experiment_name`, created (in the model-training view) if it does not exist.

    Two trainings that start together on one server may both find no experiment and both create
    it: the second creation is refused, and the one the other made is used.
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(experiment_name, tags=dict([EXPERIMENT_KIND_TAG]))
    except Exception:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(client: MlflowClient, experiment_name: str | None) -> str:
    """A new run in `experiment_name` (created if needed), else `MLFLOW_EXPERIMENT_ID`, else 0."""
    if experiment_name:
        experiment = experiment_id(client, experiment_name)
    else:
        experiment = os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"
    run = client.create_run(experiment, tags={"mlflow.source.name": "attnlog"})
    mark_experiment(client, run.info.experiment_id)
    return run.info.run_id


def mark_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Set `EXPERIMENT_KIND_TAG` on an experiment that has no kind yet (never overrides one)."""
    key, value = EXPERIMENT_KIND_TAG
    if key not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, key, value)


def sync(spool_dir: str | os.PathLike, tracking_uri: str | None = None, timeout_s: int = 30) -> int:
    """Send the events left in a spool (the `attnlog sync` command); returns how many were sent.

    Everything goes to `tracking_uri` (default: `MLFLOW_TRACKING_URI`), never to the server an
    entry names: a spool folder may be shared, and an entry is not trusted to pick a server.
    Entries that never had a run get one new run, recorded in them before anything is sent, so
    an interrupted sync can simply be run again. An entry that is damaged, names a file that was
    not spooled with it, or is refused by the server is moved to `failed/`; the others are still
    sent. One sync at a time: a second one is refused (`SpoolBusy`) before it starts a run.

    Raises:
        ValueError: no server given (the message names those the entries record), or an entry
            was written by a newer attnlog (left in place).
        SpoolBusy: another sync is sending this spool.
        ConnectionError: the server is unreachable; the entries not sent stay in the spool.
        RuntimeError: after sending the rest, some entries were moved to `failed/` (named).
    """
    require_mlflow("`attnlog sync`")
    from mlflow import MlflowClient

    spool = Spool(spool_dir)
    if not spool.entries():
        return 0
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        named = ", ".join(f"{s} ({n})" for s, n in sorted(spool.servers().items())) or "none"
        raise ValueError(
            "no MLflow server given: pass one (`--tracking-uri URI`, or `tracking_uri=`) or set "
            "MLFLOW_TRACKING_URI; sync never sends to a server named only inside the spool. "
            f"Servers its entries name (entries): {named}"
        )
    with hold(spool.folder):
        sent, failed = _send_all(spool, MlflowClient(uri), uri, timeout_s)
    if failed:
        raise RuntimeError(
            f"sent {sent} entr{'y' if sent == 1 else 'ies'}; {len(failed)} could not be sent and "
            f"were moved to {spool.folder / 'failed'}: " + "; ".join(failed)
        )
    return sent


def _send_all(
    spool: Spool, client: MlflowClient, uri: str, timeout_s: int
) -> tuple[int, list[str]]:
    """(entries sent, what was set aside and why), oldest entry first."""
    sent, failed = 0, []
    for path in spool.entries():
        if not path.exists():
            continue  # set aside by assign_run
        try:
            event = spool.load(path)
        except CorruptEntry as exc:
            kind = "refused" if isinstance(exc, RefusedEntry) else "damaged"
            failed.append(f"{spool.set_aside(path, exc).name} ({kind}: {exc})")
            continue
        try:
            with fast_http(timeout_s):
                if event.get("run_id") is None:
                    aside = spool.assign_run(start_run(client, event.get("experiment_name")))
                    failed += [f"{p.name} (set aside: damaged or refused)" for p in aside]
                    event = spool.load(path)
                send(client, event, spool.folder, functools.partial(spool.save, path, event))
        except Exception as exc:
            if is_unreachable(exc):
                left = len(spool.entries())
                raise ConnectionError(
                    f"MLflow at {uri} is unreachable; sent {sent}, {left} events left in "
                    f"{spool.folder}: {str(exc).splitlines()[0][:300]}"
                ) from exc
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            failed.append(f"{spool.set_aside(path, reason).name} (refused: {reason})")
            continue
        spool.remove(path)
        sent += 1
    return sent, failed
