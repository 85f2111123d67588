"""`attnlog report` and `attnlog compare`: read a run's archive back as a short text summary.

Both read only `<logdir>/plugins/attnlog` (`read_index` + `load`), never TensorBoard or MLflow,
so they work on a copied folder, offline, long after training.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.sinks.archive import read_index
from attnlog.sinks.base import plugin_dir
from attnlog.snapshot import Snapshot, load

# Scores outside [0, 1] (nats, raw logits): never ranked against the others.
UNBOUNDED = frozenset({"entropy_nats", "max_logit"})


def strongest_heads(
    scores: dict[str, np.ndarray], labels: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """The highest-scoring head of every bounded pattern, strongest first.

    Args:
        scores: pattern -> [L, H] (NaN = undefined, skipped).
        labels: [L, H] head labels, or None to derive them with `label_heads` when possible.
    """
    if labels is None:
        labels = _labels(scores)
    rows = []
    for pattern in sorted(scores):
        matrix = np.asarray(scores[pattern], dtype=np.float64)
        if pattern in UNBOUNDED or not np.isfinite(matrix).any():
            continue
        layer, head = np.unravel_index(np.nanargmax(matrix), matrix.shape)
        rows.append(
            {
                "pattern": pattern,
                "layer": int(layer),
                "head": int(head),
                "score": round(float(matrix[layer, head]), 4),
                "label": "" if labels is None else str(labels[layer, head]),
            }
        )
    rows.sort(key=lambda r: -r["score"])
    return rows


def format_heads(rows: list[dict[str, Any]]) -> str:
    """A compact table: pattern, layer, head, score, label."""
    lines = [f"  {'pattern':<24}{'layer':>6}{'head':>6}{'score':>8}  label"]
    for r in rows:
        lines.append(
            f"  {r['pattern']:<24}{r['layer']:>6}{r['head']:>6}{r['score']:>8.3f}  {r['label']}"
        )
    return "\n".join(lines)


def report(logdir: str | os.PathLike, step: int | None = None, as_json: bool = False) -> str:
    """Logged steps, and for `step` (default: the last) the strongest head per pattern and the
    head-label counts.

    Raises:
        FileNotFoundError: `logdir` does not exist or holds no archive.
        ValueError: `step` was not logged.
    """
    index = _index(logdir)
    steps = [e["step"] for e in index]
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ValueError(
            f"step {chosen} is not in the archive of {logdir}; logged steps: {_list(steps)}"
        )
    snapshot, scores = _load(logdir, index[steps.index(chosen)])
    labels = _labels(scores)
    rows = strongest_heads(scores, labels)
    counts = Counter(labels.ravel().tolist()) if labels is not None else Counter()
    layers, heads = _shape(scores)
    if as_json:
        return json.dumps(
            {
                "logdir": str(logdir),
                "model_type": snapshot.model_type,
                "layers": layers,
                "heads": heads,
                "steps": steps,
                "step": chosen,
                "probes": [p.name for p in snapshot.probes],
                "strongest": rows,
                "labels": dict(counts.most_common()),
            },
            indent=2,
            ensure_ascii=False,
        )
    lines = [
        f"run {logdir}: {snapshot.model_type or 'model'}, {layers} layers x {heads} heads",
        f"logged steps ({len(steps)}): {_list(steps)}",
        f"step {chosen}, probes: {', '.join(p.name for p in snapshot.probes)}",
        "strongest head per pattern:",
        format_heads(rows),
    ]
    if counts:
        lines.append("head labels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return "\n".join(lines)


def score_differences(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], patterns: Iterable[str] | None = None
) -> list[tuple[float, str, int, int]]:
    """(|b - a|, pattern, layer, head) for every head scored in both, largest first.

    Only scores in [0, 1] (not `UNBOUNDED`) are comparable across patterns; `patterns` narrows
    the choice further.
    """
    names = (set(a) & set(b) & set(patterns if patterns is not None else a)) - UNBOUNDED
    rows = []
    for pattern in sorted(names):
        delta = np.asarray(b[pattern], np.float64) - np.asarray(a[pattern], np.float64)
        for layer, head in zip(*np.nonzero(np.isfinite(delta))):
            rows.append((abs(delta[layer, head]), pattern, int(layer), int(head)))
    rows.sort(key=lambda r: -r[0])
    return rows


def compare(run_a: str | os.PathLike, run_b: str | os.PathLike, top: int = 10) -> str:
    """The heads whose scores differ most between the last logged steps of two runs.

    Raises:
        FileNotFoundError: a folder holds no archive.
        ValueError: the runs' models have different numbers of layers or heads.
    """
    index_a, index_b = _index(run_a), _index(run_b)
    _, a = _load(run_a, index_a[-1])
    _, b = _load(run_b, index_b[-1])
    shape_a, shape_b = _shape(a), _shape(b)
    if shape_a != shape_b:
        raise ValueError(
            f"cannot compare: {run_a} has {shape_a[0]} layers x {shape_a[1]} heads, {run_b} has "
            f"{shape_b[0]} x {shape_b[1]}; compare runs of the same model"
        )
    rows = score_differences(a, b)
    step_a, step_b = index_a[-1]["step"], index_b[-1]["step"]
    lines = [
        f"A: {run_a} (step {step_a})",
        f"B: {run_b} (step {step_b})",
        f"  {'pattern':<24}{'layer':>6}{'head':>6}{'A':>8}{'B':>8}{'B-A':>8}",
    ]
    for _, pattern, layer, head in rows[:top]:
        va, vb = float(a[pattern][layer, head]), float(b[pattern][layer, head])
        lines.append(f"  {pattern:<24}{layer:>6}{head:>6}{va:>8.3f}{vb:>8.3f}{vb - va:>+8.3f}")
    if not rows:
        lines.append("  (no pattern scored in both runs)")
    elif rows[0][0] == 0:
        lines.append("  (every score is the same in both runs)")
    return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------------------


def _index(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    index = read_index(root)
    if index:
        return index
    runs = sorted(str(p.parent.parent.parent) for p in root.glob("*/plugins/attnlog/index.jsonl"))
    hint = (
        f"; runs inside it: {', '.join(runs)}"
        if runs
        else "; log with AttentionLogger (archive=True, the default) or `attnlog snapshot`"
    )
    raise FileNotFoundError(
        f"no attnlog archive in {root} (no {plugin_dir(root)}/index.jsonl){hint}"
    )


def _load(
    logdir: str | os.PathLike, entry: dict[str, Any]
) -> tuple[Snapshot, dict[str, np.ndarray]]:
    return load(plugin_dir(logdir) / entry["file"])


def _labels(scores: dict[str, np.ndarray]) -> np.ndarray | None:
    from attnlog.patterns import _LABEL_INPUTS, label_heads

    if not all(name in scores for name in _LABEL_INPUTS):
        return None
    return label_heads(scores)


def _shape(scores: dict[str, np.ndarray]) -> tuple[int, int]:
    if not scores:
        return (0, 0)
    layers, heads = np.shape(next(iter(scores.values())))
    return int(layers), int(heads)


def _list(steps: list[int], limit: int = 20) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:10])) + ", ..., " + ", ".join(map(str, steps[-5:]))
