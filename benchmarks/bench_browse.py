"""Browsing a long run: the Attention tab's routes and `attnlog report` on 10,000 logged steps.

Builds a run as the archive sink writes it (index, score table, one step file per step) for a
4-layer model with 8 probes, then times each route of the tab through the plugin's own WSGI
app (JSON and gzip included, as a browser asks) and `attnlog report`, cold (a new plugin, its
caches emptied; the OS file cache stays warm) and warm (the same request again). `report`
is timed as it is, and as it would read with its step list from the score table.

    PYTHONPATH=. python3 benchmarks/bench_browse.py            # 10,000 steps, ~1 min to build
    PYTHONPATH=. python3 benchmarks/bench_browse.py --steps 1000 --baseline

`--baseline` also times `/trend` on the same run without its score table (as archives written
before the table are read: one step file per step). Step files are hard links to one real
archive file (the routes never compare their contents), so the run takes little disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from attnlog.layout import plugin_dir
from attnlog.patterns import PATTERNS, ScoreTable
from attnlog.score_history import TABLE_DIR
from attnlog.sinks.archive import ArchiveSink
from attnlog.snapshot import ProbeAttention, Snapshot

GOAL_S = 0.2


class LinkingSink(ArchiveSink):
    """The archive sink, but each step file is a hard link to one saved archive: the index and
    the score table are written by the sink's own code, at the speed of a long run's metadata."""

    def __init__(self, logdir: Path, template: Path) -> None:
        super().__init__(logdir)
        self.template = template

    def _save(self, snapshot, table, path) -> None:
        try:
            os.link(self.template, path)
        except OSError:  # a file system without hard links
            shutil.copyfile(self.template, path)


def make_snapshot(layers: int, heads: int, probes: int, tokens: int) -> Snapshot:
    rng = np.random.default_rng(0)
    made = []
    for k in range(probes):
        logits = rng.normal(size=(layers, heads, tokens, tokens))
        attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        made.append(
            ProbeAttention(
                name=f"probe_{k}",
                tokens=[f"tok{i}" for i in range(tokens)],
                attention=attention.astype(np.float32),
                special=np.zeros(tokens, bool),
                punct=np.zeros(tokens, bool),
                segment=np.zeros(tokens, np.int64),
                token_ids=np.arange(tokens),
                word_ids=np.arange(tokens),
            )
        )
    return Snapshot(step=0, probes=made, model_type="bert")


def build(root: Path, args: argparse.Namespace) -> list[int]:
    snapshot = make_snapshot(args.layers, args.heads, args.probes, args.tokens)
    rng = np.random.default_rng(1)
    template = root / "template.npz"
    scores = {p: rng.random((args.layers, args.heads), dtype=np.float32) for p in PATTERNS}
    snapshot.save(template, scores=scores)
    sink = LinkingSink(root / "run", template)
    steps = [i * args.every for i in range(args.steps)]
    for step in steps:
        scores = {p: rng.random((args.layers, args.heads), dtype=np.float32) for p in PATTERNS}
        sink.log_archive(snapshot, ScoreTable(step, scores), step)
    return steps


def cold() -> None:
    """Empty every cache of the plugin's readers (what a freshly started TensorBoard has)."""
    from attnlog.tensorboard_plugin import plugin, runs

    for fn in (runs._table_steps, runs._index_steps, runs.load_by_key, runs._scores, plugin._words):
        fn.cache_clear()


def time_route(logdir: Path, route: str, query: dict, repeat: int) -> tuple[float, float, int]:
    """(cold s, warm s median, response bytes) of one route through the plugin's WSGI app."""
    from tensorboard.plugins.base_plugin import TBContext
    from werkzeug.test import Client

    from attnlog.tensorboard_plugin.plugin import AttentionPlugin

    def call(apps) -> tuple[float, int]:
        started = time.perf_counter()
        response = Client(apps[route]).get(
            route, query_string=query, headers={"Accept-Encoding": "gzip"}
        )
        body = response.get_data()
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, body[:200]
        return elapsed, len(body)

    cold()
    apps = AttentionPlugin(TBContext(logdir=str(logdir))).get_plugin_apps()
    first, size = call(apps)
    warm = statistics.median(call(apps)[0] for _ in range(repeat))
    return first, warm, size


def time_report(run: Path, repeat: int) -> tuple[float, float]:
    from attnlog.report import report

    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        report(run)
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="logged steps")
    parser.add_argument("--every", type=int, default=10, help="training steps between events")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per probe")
    parser.add_argument("--repeat", type=int, default=5, help="warm calls (median)")
    parser.add_argument("--baseline", action="store_true", help="also /trend without the table")
    parser.add_argument("--keep", type=Path, help="build the run here and keep it")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="attnlog-browse-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        steps = build(root, args)
        print(
            f"built {len(steps)} logged steps ({args.layers} layers x {args.heads} heads, "
            f"{args.probes} probes of {args.tokens} tokens, {len(PATTERNS)} patterns) in "
            f"{time.perf_counter() - started:.1f} s, load average {os.getloadavg()[0]:.2f}"
        )
        report_rows(root, steps, args)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def report_rows(root: Path, steps: list[int], args: argparse.Namespace) -> None:
    last, pattern = str(steps[-1]), "prev_token"
    routes = [
        ("/runs", {}),
        ("/scores", {"run": "run", "step": last}),
        ("/attention", {"run": "run", "step": last, "probe": "probe_0", "layer": 1, "head": 2}),
        ("/trend", {"run": "run", "pattern": pattern, "layer": 1, "head": 2}),
    ]
    print(f"\n{'what':<34}{'cold s':>9}{'warm s':>9}{'bytes':>10}   goal")
    for route, query in routes:
        first, warm, size = time_route(root, route, query, args.repeat)
        verdict = "ok" if max(first, warm) <= GOAL_S else "MISSED"
        print(f"{route:<34}{first:>9.3f}{warm:>9.3f}{size:>10}   <= {GOAL_S} s  {verdict}")
    first, warm = time_report(root / "run", args.repeat)
    verdict = "ok" if max(first, warm) <= GOAL_S else "MISSED"
    print(f"{'attnlog report':<34}{first:>9.3f}{warm:>9.3f}{'':>10}   <= {GOAL_S} s  {verdict}")
    if args.baseline:
        shutil.rmtree(plugin_dir(root / "run") / TABLE_DIR)
        first, warm, size = time_route(root, *routes[3], repeat=1)
        print(f"{'/trend without the table':<34}{first:>9.3f}{warm:>9.3f}{size:>10}   (before)")


if __name__ == "__main__":
    main()
