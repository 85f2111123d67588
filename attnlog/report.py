"""`attnlog.load` and `attnlog report`: read a run's archive back, as a `Snapshot` or a summary.

Both read only `<logdir>/plugins/attnlog` (`layout.read_index` + the step files), never
TensorBoard or MLflow, so they work on a copied folder, offline, long after training. A damaged
run is still summarised: unreadable index lines and missing or truncated step files are skipped
with one warning each. `attnlog.compare` ranks the differences of two runs with the helpers here.

Patterns whose scores are identical (`cls` and `sink` for BERT-family models, whose [CLS] is the
first token) are shown once, as `cls (= sink)`, so rankings hold no duplicate pairs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from attnlog.layout import INDEX, archive_name, archive_path, plugin_dir, read_index
from attnlog.notes import warn_once
from attnlog.score_history import logged_steps
from attnlog.snapshot import ProbeAttention, Snapshot
from attnlog.snapshot import _load as _load_file  # the file format's own reader, for `load`

__all__ = [
    "UNBOUNDED",
    "format_heads",
    "load",
    "named",
    "report",
    "same_scores",
    "score_differences",
    "score_shape",
    "strongest_heads",
]

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
    aliases = same_scores(scores)
    rows = []
    for pattern in sorted(aliases):
        matrix = np.asarray(scores[pattern], dtype=np.float64)
        if pattern in UNBOUNDED or not np.isfinite(matrix).any():
            continue
        layer, head = np.unravel_index(np.nanargmax(matrix), matrix.shape)
        rows.append(
            {
                "pattern": pattern,
                "same_as": aliases[pattern],
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
        name = named(r["pattern"], r.get("same_as", []))
        lines.append(f"  {name:<24}{r['layer']:>6}{r['head']:>6}{r['score']:>8.3f}  {r['label']}")
    return "\n".join(lines)


def same_scores(*runs: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Pattern -> the other patterns with the same scores in every run given (NaN = NaN).

    Only the first of each group (sorted by name) is a key, so iterating over the keys visits
    each distinct score once: for BERT-family models `{"cls": ["sink"], ...}`.
    """
    names = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    groups: dict[str, list[str]] = {}
    for name in names:
        for first, others in groups.items():
            if all(_same(r[first], r[name]) for r in runs):
                others.append(name)
                break
        else:
            groups[name] = []
    return groups


def report(logdir: str | os.PathLike, step: int | None = None, as_json: bool = False) -> str:
    """Logged steps, and for `step` (default: the last) the strongest head per pattern and the
    head-label counts.

    Raises:
        FileNotFoundError: `logdir` does not exist or holds no archive.
        ValueError: `step` was not logged.
    """
    index = _index(logdir)
    steps = [e["step"] for e in index]
    entry, snapshot = _last(logdir, index) if step is None else _step(logdir, index, step)
    chosen, scores = entry["step"], snapshot.scores
    labels = _labels(scores)
    rows = strongest_heads(scores, labels)
    counts = Counter(labels.ravel().tolist()) if labels is not None else Counter()
    layers, heads = score_shape(scores)
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


def _step(
    logdir: str | os.PathLike, index: list[dict[str, Any]], step: int
) -> tuple[dict[str, Any], Snapshot]:
    steps = [e["step"] for e in index]
    if step not in steps:
        raise ValueError(
            f"step {step} is not in the archive of {logdir}; logged steps: {_list(steps)}"
        )
    entry = index[steps.index(step)]
    snapshot = _read(logdir, entry)
    if snapshot is None:
        raise ValueError(f"the archive file of step {step} in {logdir} is missing or damaged")
    return entry, snapshot


def score_differences(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], patterns: Iterable[str] | None = None
) -> list[tuple[float, str, int, int]]:
    """(|b - a|, pattern, layer, head) for every head scored in both, largest first.

    Only scores in [0, 1] (not `UNBOUNDED`) are comparable across patterns; `patterns` narrows
    the choice further. Patterns with identical scores in both runs count once, under the first
    name (`same_scores(a, b)` gives the others).
    """
    names = (set(a) & set(b) & set(patterns if patterns is not None else a)) - UNBOUNDED
    names &= set(same_scores(a, b))
    rows = []
    for pattern in sorted(names):
        delta = np.asarray(b[pattern], np.float64) - np.asarray(a[pattern], np.float64)
        for layer, head in zip(*np.nonzero(np.isfinite(delta))):
            rows.append((abs(delta[layer, head]), pattern, int(layer), int(head)))
    rows.sort(key=lambda r: -r[0])
    return rows


# -- helpers ------------------------------------------------------------------------------------


def _index(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass the logdir the logger wrote to")
    steps = logged_steps(root)  # the score table: one read, however long the run
    index = (
        read_index(root) if steps is None else [{"step": s, "file": archive_name(s)} for s in steps]
    )
    if index:
        return index
    runs = sorted(str(p.parent.parent.parent) for p in root.glob(f"*/plugins/attnlog/{INDEX}"))
    hint = (
        f"; runs inside it: {', '.join(runs)}"
        if runs
        else "; log with AttentionLogger (archive=True, the default) or `attnlog snapshot`"
    )
    raise FileNotFoundError(f"no attnlog archive in {root} (no {plugin_dir(root) / INDEX}){hint}")


def load(path: str | os.PathLike, step: int | None = None) -> Snapshot:
    """One archived step as a `Snapshot` whose `.scores` holds its pattern scores (`[L, H]`).

    Args:
        path: a step's `.npz`, or a run's logdir (then the last readable step, or `step`).

    Raises:
        FileNotFoundError: no archive there. ValueError: `step` was not logged or is damaged.
        NotARegularFile: `path` is a FIFO or a device (never opened for reading).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return _checked(_load_file(path), path)
    index = _index(path)
    if step is None:
        return _last(path, index)[1]
    entry = next((e for e in index if e["step"] == step), None)
    if entry is None:
        steps = [e["step"] for e in index]
        raise ValueError(f"step {step} was not logged in {path}; logged steps: {_list(steps)}")
    file = archive_path(path, entry)
    return _checked(_load_file(file), file)  # its own error: missing, truncated, damaged


def _read(logdir: str | os.PathLike, entry: dict[str, Any]) -> Snapshot | None:
    """The step's snapshot, or None (warned once) when its file is missing or damaged."""
    path = archive_path(logdir, entry)
    try:
        return _checked(_load_file(path), path)
    except Exception as exc:  # missing, truncated, not an archive, a newer format, crafted
        warn_once(path, f"attnlog: skipping step {entry['step']}: cannot read {path}: {exc}")
        return None


def _checked(snapshot: Snapshot, path: Path) -> Snapshot:
    """`snapshot` once its arrays fit together: a damaged or crafted archive (a cut token list,
    1-D scores) is refused here with what is wrong, not with an IndexError deep in a reader."""
    try:
        score_shape(snapshot.scores)
        for probe in snapshot.probes:
            problem = _probe_problem(probe)
            if problem:
                raise ValueError(f"probe {probe.name!r}: {problem}")
    except ValueError as exc:
        raise ValueError(f"{path} is damaged: {exc}") from None
    return snapshot


def _probe_problem(probe: ProbeAttention) -> str | None:
    """What does not fit in one probe's archived arrays, or None."""
    if not all(isinstance(t, str) for t in probe.tokens):
        return "its tokens are not all text"
    shape = np.shape(probe.attention)
    if len(shape) != 4 or shape[2] != shape[3]:
        return f"attention is {shape}, not [layers, heads, n, n]"
    rows, what = (probe.labels, "block labels") if probe.pooled else (probe.tokens, "tokens")
    if rows is None or len(rows) != shape[2]:
        return f"attention has {shape[2]} rows for {len(rows or [])} {what}"
    if probe.pooled and not _spans_fit(probe.spans, shape[2], len(probe.tokens)):
        return (
            f"spans are not {shape[2]} ordered token ranges inside its {len(probe.tokens)} tokens"
        )
    n, m = len(probe.tokens), len(probe.decoder_tokens or [])  # encoder and decoder tokens
    for name in ("special", "punct", "segment", "word_ids", "token_ids"):
        value = getattr(probe, name)
        if value is not None and np.shape(value) != (n,):
            return f"{name} is {np.shape(value)}, not [{n}] (one per token)"
    cols = {"decoder_attention": m, "cross_attention": shape[2]}  # keys: the encoder's rows
    for name, want in cols.items():
        value = getattr(probe, name)
        if value is not None and np.shape(value)[2:] != (m, want):
            return f"{name} is {np.shape(value)}, not [layers, heads, {m}, {want}]"
    return None


def _spans_fit(spans: np.ndarray, blocks: int, n: int) -> bool:
    """Whether `spans` are `blocks` ordered `[start, end)` token ranges inside `n` tokens."""
    spans = np.asarray(spans)
    if spans.shape != (blocks, 2) or spans.dtype.kind not in "iu":
        return False
    starts, ends = spans[:, 0], spans[:, 1]
    return bool((starts >= 0).all() and (ends <= n).all() and (starts < ends).all()
                and (starts[1:] >= ends[:-1]).all())  # fmt: skip


def _last(
    logdir: str | os.PathLike, index: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], Snapshot]:
    """The last step whose archive file reads, and its snapshot."""
    index = _index(logdir) if index is None else index
    for entry in reversed(index):
        snapshot = _read(logdir, entry)
        if snapshot is not None:
            return entry, snapshot
    raise FileNotFoundError(
        f"no readable step in {plugin_dir(logdir)}: every indexed archive file is missing or "
        "damaged"
    )


def named(pattern: str, same_as: list[str]) -> str:
    """`cls (= sink)`: a pattern shown with the patterns whose scores are the same."""
    return f"{pattern} (= {', '.join(same_as)})" if same_as else pattern


def _same(x: np.ndarray, y: np.ndarray) -> bool:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=0, atol=1e-6, equal_nan=True))


def _labels(scores: dict[str, np.ndarray]) -> np.ndarray | None:
    from attnlog.patterns import LABEL_INPUTS, label_heads

    if not all(name in scores for name in LABEL_INPUTS):
        return None
    return label_heads(scores)


def score_shape(scores: dict[str, np.ndarray]) -> tuple[int, int]:
    """(layers, heads) of a run's scores: the `[L, H]` every pattern shares ((0, 0) without any).

    Raises:
        ValueError: a pattern's scores are not `[L, H]` or not the same shape as the others'.
    """
    shapes = {name: np.shape(matrix) for name, matrix in scores.items()}
    if not shapes:
        return (0, 0)
    first = next(iter(shapes.values()))
    odd = {name: shape for name, shape in shapes.items() if shape != first or len(shape) != 2}
    if odd:
        raise ValueError(
            f"pattern scores must all be [layers, heads] of one shape; got {first} and {odd}"
        )
    return int(first[0]), int(first[1])


def _list(steps: list[int], limit: int = 20) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:10])) + ", ..., " + ", ".join(map(str, steps[-5:]))
