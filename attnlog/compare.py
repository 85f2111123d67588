"""`attnlog compare A B`: two runs' pattern scores side by side, as text and as one HTML page.

A run is a logdir (its archive's last step) or an MLflow run (`runs:/<id>` or a bare run id):
MLflow runs are read from their last `attention/step_<8 digits>/scores.json` artifact (every head
of the last event; one small download), or, for a run without one, from per-head metrics
`attn.<pattern>.L<l>H<h>` (the latest value of each; `MLflowSink(head_metrics=True)`). The page is
self-contained (images inline as PNG data URIs, no script, no CDN) and, for MLflow runs, logged
to both runs as an artifact under `attnlog_compare/`.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from attnlog.report import load, named, same_scores, score_differences, score_shape

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["RunScores", "compare", "compare_page", "compare_runs", "read_run"]

_METRIC = re.compile(
    r"^attn\.(?P<pattern>.+)\.L(?P<layer>\d{1,9})H(?P<head>\d{1,9})$"
)  # layout.mlflow_metric
# Bounds on what an MLflow run's metric names may ask for (the largest models have ~130 layers
# and ~130 heads): a name like `attn.sink.L200000H200000` would otherwise allocate 149 GiB.
MAX_LAYERS = MAX_HEADS = 4096
MAX_CELLS = 2**24  # patterns x layers x heads read from one run: 64 MiB of float32
_MAX_SCORES_JSON = 64 * 2**20  # a 130-layer, 130-head model's, 8 probes: about 30 MiB
_ARTIFACT_DIR = "attnlog_compare"
_MAX_PATTERNS = 6  # patterns drawn as matrices: those of the heads that changed most


@dataclass
class RunScores:
    """One run's scores: pattern -> `[L, H]`, and where they came from."""

    name: str
    scores: dict[str, np.ndarray]
    step: int | None = None
    run_id: str | None = None  # the MLflow run, None for a logdir

    @property
    def label(self) -> str:
        return self.name + ("" if self.step is None else f" (step {self.step})")


def read_run(run: str, tracking_uri: str | None = None) -> RunScores:
    """A logdir's last archived step, or an MLflow run's last `scores.json` (else its latest
    per-head metrics).

    Raises:
        FileNotFoundError: a folder with no archive.
        ValueError: neither a folder nor a run id, or an MLflow run with no attnlog scores.
    """
    if Path(run).is_dir():
        snapshot = load(run)  # the last readable step
        return RunScores(str(run), dict(snapshot.scores), snapshot.step)
    run_id = run[len("runs:/") :].strip("/").split("/")[0] if run.startswith("runs:/") else run
    if not re.fullmatch(r"[0-9a-zA-Z_-]{8,}", run_id):
        raise ValueError(
            f"{run!r} is neither a folder nor an MLflow run id; pass a logdir, runs:/<run id> or "
            "a run id"
        )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run_info = client.get_run(run_id)
    name = f"{run_info.info.run_name or run_id} ({run_id[:8]})"
    logged = _last_scores_json(client, run_id)
    if logged is not None:
        step, scores = logged
        return RunScores(name, scores, step, run_id=run_id)
    return RunScores(name, _metric_scores(run_info.data.metrics, run_id), run_id=run_id)


def _last_scores_json(client: MlflowClient, run_id: str) -> tuple[int, dict] | None:
    """(step, pattern -> `[L, H]`) from the run's last `attention/step_<8>/scores.json`, or
    None when it has none. A file that is too large or not a score table is refused."""
    import json
    import tempfile

    steps = sorted(
        (int(f.path.rsplit("_", 1)[1]), f.path)
        for f in client.list_artifacts(run_id, "attention")
        if f.is_dir and re.fullmatch(r"attention/step_\d{8,}", f.path)
    )
    for step, folder in reversed(steps):
        found = [f for f in client.list_artifacts(run_id, folder) if f.path.endswith("scores.json")]
        if not found:
            continue
        if (found[0].file_size or 0) > _MAX_SCORES_JSON:
            raise ValueError(f"MLflow run {run_id}'s {found[0].path} is over 64 MiB: not attnlog's")
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, found[0].path, tmp)
            with open(local, encoding="utf-8") as fh:
                data = json.load(fh)
        return step, _json_scores(data, f"MLflow run {run_id}'s {found[0].path}")
    return None


def _json_scores(data: object, where: str) -> dict[str, np.ndarray]:
    """pattern -> `[L, H]` from a `scores.json` (`ScoreTable.to_json`; null -> NaN)."""
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{where} holds no attnlog scores")
    out = {}
    for pattern, rows in scores.items():
        try:
            matrix = np.array(rows, dtype=np.float64)  # None -> nan
        except (TypeError, ValueError):
            matrix = np.zeros(0)
        if matrix.ndim != 2 or 0 in matrix.shape:
            raise ValueError(f"{where}: {str(pattern)[:100]!r} is not a [layers, heads] matrix")
        out[str(pattern)] = matrix.astype(np.float32)
    return out


def _metric_scores(metrics: dict[str, float], run_id: str) -> dict[str, np.ndarray]:
    """pattern -> `[L, H]` from `attn.<pattern>.L<l>H<h>` metrics (NaN where none was logged).

    Raises:
        ValueError: no such metric, or names that ask for an absurd number of layers or heads.
    """
    found: dict[str, dict[tuple[int, int], float]] = {}
    for key, value in metrics.items():
        match = _METRIC.match(key)
        if match:
            cell = (int(match["layer"]), int(match["head"]))
            if cell[0] >= MAX_LAYERS or cell[1] >= MAX_HEADS:
                raise ValueError(
                    f"MLflow run {run_id} has metric {key[:200]!r}: attnlog reads at most "
                    f"{MAX_LAYERS} layers and {MAX_HEADS} heads; is this an attnlog run?"
                )
            found.setdefault(match["pattern"], {})[cell] = float(value)
    if not found:
        raise ValueError(
            f"MLflow run {run_id} has no attnlog scores (attention/step_*/scores.json or "
            "attn.<pattern>.L<l>H<h> metrics); was it logged with the MLflow sink?"
        )
    layers = 1 + max(layer for cells in found.values() for layer, _ in cells)
    heads = 1 + max(head for cells in found.values() for _, head in cells)
    if len(found) * layers * heads > MAX_CELLS:
        raise ValueError(
            f"MLflow run {run_id}'s attnlog metrics ask for {len(found)} patterns x {layers} "
            f"layers x {heads} heads, over attnlog's limit of {MAX_CELLS} scores"
        )
    scores = {}
    for pattern, cells in found.items():
        matrix = np.full((layers, heads), np.nan, dtype=np.float32)
        for (layer, head), value in cells.items():
            matrix[layer, head] = value
        scores[pattern] = matrix
    return scores


def compare(run_a: str, run_b: str, *, top: int = 10, tracking_uri: str | None = None) -> str:
    """The `top` heads whose scores differ most between two runs (logdirs or MLflow runs).

    Raises:
        FileNotFoundError: a folder holds no archive.
        ValueError: the runs' models differ in layers or heads, or a run is not found.
    """
    a, b = read_run(run_a, tracking_uri), read_run(run_b, tracking_uri)
    return _text(a, b, top)


def compare_runs(
    run_a: str,
    run_b: str,
    *,
    out: str | os.PathLike | None = None,
    top: int = 10,
    tracking_uri: str | None = None,
    log_to_runs: bool = True,
) -> tuple[str, list[str]]:
    """Compare two runs: (a text table of the `top` heads that changed most, lines saying
    where the page went). With `out`, writes the HTML page; MLflow runs also get it logged
    (unless `log_to_runs=False`).

    Raises:
        ValueError: the runs' models differ in layers or heads.
    """
    a, b = read_run(run_a, tracking_uri), read_run(run_b, tracking_uri)
    text = _text(a, b, top)
    written: list[str] = []
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(compare_page(a, b, top=top), encoding="utf-8")
        written.append(f"wrote {out}")
        if log_to_runs:
            written += _log_page(out, [r.run_id for r in (a, b) if r.run_id], tracking_uri)
    return text, written


def compare_page(a: RunScores, b: RunScores, *, top: int = 10) -> str:
    """One HTML document: the heads that changed most, then per pattern A | B | B - A."""
    rows = score_differences(a.scores, b.scores)
    table = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{layer}</td><td>{head}</td>"
        f"<td>{a.scores[p][layer, head]:.3f}</td><td>{b.scores[p][layer, head]:.3f}</td>"
        f"<td>{b.scores[p][layer, head] - a.scores[p][layer, head]:+.3f}</td></tr>"
        for _, p, layer, head in rows[:top]
    )
    patterns = list(dict.fromkeys(p for _, p, _, _ in rows))[:_MAX_PATTERNS]
    sections = "".join(_pattern_section(p, a, b) for p in patterns)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>attnlog compare: {html.escape(a.name)} vs {html.escape(b.name)}</title>"
        "<style>body{font-family:Helvetica,Arial,sans-serif;margin:16px}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}tr:nth-child(even){background:#f3f3f3}"
        ".row{display:flex;gap:12px;flex-wrap:wrap}figure{margin:0}"
        "figcaption{font-size:13px;color:#333}</style></head><body>\n"
        f"<h1>Attention: what changed</h1>\n<p>A: {html.escape(a.label)}<br>"
        f"B: {html.escape(b.label)}</p>\n"
        f"<h2>The {min(top, len(rows))} heads that changed most</h2>\n"
        "<table id='changed'><tr><th>pattern</th><th>layer</th><th>head</th><th>A</th>"
        f"<th>B</th><th>B&minus;A</th></tr>{table}</table>\n"
        f"<h2>Score matrices (layer &times; head)</h2>\n{sections}</body></html>\n"
    )


# ---- helpers ---------------------------------------------------------------------------------


def _check_shapes(a: RunScores, b: RunScores) -> None:
    shape_a, shape_b = score_shape(a.scores), score_shape(b.scores)
    if shape_a != shape_b:
        raise ValueError(
            f"cannot compare: {a.name} has {shape_a[0]} layers x {shape_a[1]} heads, {b.name} "
            f"has {shape_b[0]} x {shape_b[1]}; compare runs of the same model"
        )


def _text(a: RunScores, b: RunScores, top: int) -> str:
    """The table both `compare` and the command print: the `top` rows of `score_differences`."""
    _check_shapes(a, b)
    rows = score_differences(a.scores, b.scores)
    aliases = same_scores(a.scores, b.scores)
    lines = [
        f"A: {a.label}",
        f"B: {b.label}",
        f"  {'pattern':<24}{'layer':>6}{'head':>6}{'A':>8}{'B':>8}{'B-A':>8}",
    ]
    for _, p, layer, head in rows[:top]:
        va, vb = float(a.scores[p][layer, head]), float(b.scores[p][layer, head])
        name = named(p, aliases.get(p, []))
        lines.append(f"  {name:<24}{layer:>6}{head:>6}{va:>8.3f}{vb:>8.3f}{vb - va:>+8.3f}")
    if not rows:
        lines.append("  (no pattern scored in both runs)")
    elif rows[0][0] == 0:
        lines.append("  (every score is the same in both runs)")
    return "\n".join(lines)


def _pattern_section(pattern: str, a: RunScores, b: RunScores) -> str:
    from attnlog.render.heatmap import render_matrix

    ma, mb = np.asarray(a.scores[pattern], np.float32), np.asarray(b.scores[pattern], np.float32)
    diff = mb - ma
    finite = np.abs(diff[np.isfinite(diff)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    figures = [
        ("A", render_matrix(ma, title=f"{pattern} · A")),
        ("B", render_matrix(mb, title=f"{pattern} · B")),
        ("B − A", render_matrix(diff, title=f"{pattern} · B − A", vmin=-bound, vmax=bound)),
    ]
    body = "".join(
        f"<figure><img alt='{html.escape(f'{pattern} {name}')}' src='{_png_uri(image)}'>"
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, image in figures
    )
    return f"<h3>{html.escape(pattern)}</h3>\n<div class='row'>{body}</div>\n"


def _png_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _log_page(path: Path, run_ids: list[str], tracking_uri: str | None) -> list[str]:
    if not run_ids:
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for run_id in run_ids:
        client.log_artifact(run_id, str(path), artifact_path=_ARTIFACT_DIR)
    return [f"logged {_ARTIFACT_DIR}/{path.name} to MLflow run {r}" for r in run_ids]
