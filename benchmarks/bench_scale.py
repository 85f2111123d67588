"""Scale benchmark: memory, stall and sizes of one logging event on long probes.

    PYTHONPATH=. python3 benchmarks/bench_scale.py                 # CPU: 8-layer GQA decoder
    PYTHONPATH=. python3 benchmarks/bench_scale.py --device cuda   # GPU: the 1.1B Llama config

Needs only torch and transformers (the tokenizer is built in memory; no download). On the CPU it
also writes one event through the real writer (TensorBoard + archive + HTML views) when
tensorboard is installed, and runs one 32k-token probe through the chunked path. Every
measurement runs in a fresh child process, so one measurement's peak cannot hide another's.
Prints a table and names each failing goal with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20
VOCAB = 32000


def _tokenizer(max_length: int):
    """A word-level tokenizer over VOCAB made-up tokens: token ids are all the benchmark needs."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0"
    )
    tok.model_max_length = max_length
    return tok


def _model(kind: str, device: str, positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {  # layers, hidden, heads, kv heads, intermediate
        "cpu8": (8, 256, 8, 2, 512),
        "1.1b": (24, 2048, 16, 4, 5632),
        "tiny": (1, 32, 2, 1, 64),
    }[kind]
    layers, hidden, heads, kv, inter = sizes
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=positions,
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device=device, dtype=dtype), config


def _probes(count: int, n: int):
    import numpy as np

    from attnlog.probes import Probe

    rng = np.random.default_rng(0)
    return [Probe(ids=rng.integers(1, VOCAB, n).tolist(), name=f"long{i}") for i in range(count)]


class _PeakRSS:
    """Samples this process's resident memory every millisecond while it runs."""

    def __init__(self) -> None:
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = _rss()
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if max_after > self._max_before:  # a peak the sampler missed, above every earlier one
            self.peak = max(self.peak, max_after)

    @property
    def added(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- the measurements (each in its own child process) ----------------------------------------


def measure_cpu(probes: int, tokens: int) -> dict:
    """CPU, 8-layer GQA decoder: RSS added by one event vs one layer's attention, archive, HTML."""
    import torch

    from attnlog.capturing import Capturer

    torch.set_num_threads(2)
    model, config = _model("cpu8", "cpu", tokens)
    cap = Capturer(model, _tokenizer(tokens), _probes(probes, tokens), induction_probe=False)
    one_layer = probes * config.num_attention_heads * tokens * tokens * 4
    added, stalls = [], []
    for step in range(3):  # the first pass also pays one-time costs (imports, allocator arenas)
        with _PeakRSS() as rss:
            started = time.perf_counter()
            snapshot, table = cap.measure(step)
            stalls.append(time.perf_counter() - started)
        added.append(rss.added)
    result = {
        "one_layer_bytes": one_layer,
        "first_rss_added_bytes": added[0],
        "rss_added_bytes": max(added[1:]),
        "stall_s": min(stalls),
    }
    with tempfile.TemporaryDirectory() as tmp:
        archive = snapshot.save(Path(tmp) / "step.npz", scores=table.scores)
        result["archive_bytes"] = archive.stat().st_size
        result.update(_write_event(snapshot, table, tmp))
    return result


def _write_event(snapshot, table, logdir: str) -> dict:
    """One event through the real writer: TensorBoard, archive and the three HTML views."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return {"write_skipped": "tensorboard is not installed"}
    from attnlog.writer import Event, EventWriter, WriterConfig

    config = WriterConfig(sinks=[("tensorboard", {}), ("archive", {})], logdir=logdir,
                          views=("head", "model", "neuron"), strict=True)  # fmt: skip
    started = time.perf_counter()
    writer = EventWriter.from_config(config, report=lambda key, message: print(message))
    writer.write(Event(step=snapshot.step, snapshot=snapshot, table=table))
    writer.close()
    seconds = time.perf_counter() - started
    if writer.failure is not None:
        return {"write_error": repr(writer.failure)}
    pages = list(Path(logdir).rglob("*.html"))
    return {
        "write_s": seconds,
        "largest_html_bytes": max((p.stat().st_size for p in pages), default=0),
        "html_pages": len(pages),
    }


def measure_long(tokens: int) -> dict:
    """One probe of `tokens` tokens on a tiny decoder: the chunked path's peak RSS."""
    import torch

    from attnlog.capturing import Capturer

    torch.set_num_threads(2)
    model, _ = _model("tiny", "cpu", tokens)
    tokenizer = _tokenizer(tokens)
    warm = Capturer(model, tokenizer, _probes(1, min(tokens, 2048)), induction_probe=False)
    warm.measure(0)  # the process's first pass pays one-time costs (imports, allocator arenas)
    cap = Capturer(model, tokenizer, _probes(1, tokens), induction_probe=False)
    with _PeakRSS() as rss:
        started = time.perf_counter()
        snapshot, table = cap.measure(0)
        seconds = time.perf_counter() - started
    assert snapshot.probes[0].pooled
    return {"rss_added_bytes": rss.added, "seconds": seconds}


def measure_gpu(probes: int, tokens: int) -> dict:
    """GPU, 1.1B config, bf16: memory added by one event vs one training step at batch 1."""
    import torch

    from attnlog.capturing import Capturer

    model, _ = _model("1.1b", "cuda", tokens)
    ids = torch.randint(1, VOCAB, (1, tokens), device="cuda")
    torch.cuda.synchronize()

    def train_step() -> int:
        model.train()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)
        return peak

    train_step()  # warm-up: kernels, allocator
    step_bytes = train_step()
    cap = Capturer(model, _tokenizer(tokens), _probes(probes, tokens), induction_probe=False)
    cap.measure(0)  # warm-up: contexts, kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with _PeakRSS() as rss:
        started = time.perf_counter()
        snapshot, table = cap.measure(1)
        torch.cuda.synchronize()
        stall = time.perf_counter() - started
    return {
        "device": torch.cuda.get_device_name(),
        "train_step_bytes": step_bytes,
        "event_gpu_bytes": torch.cuda.max_memory_allocated() - before,
        "stall_s": stall,
        "rss_added_bytes": rss.added,
        "archive_bytes": _archive_size(snapshot, table),
    }


def _archive_size(snapshot, table) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return snapshot.save(Path(tmp) / "step.npz", scores=table.scores).stat().st_size


# ---- driver ------------------------------------------------------------------------------------


def _child(name: str, *args) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, '.'); import benchmarks.bench_scale as b; "
        f"print('RESULT', json.dumps(b.{name}(*{args!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}


def _row(label: str, value: str, goal: str, ok: bool | None, why: str = "") -> tuple:
    return label, value, goal, {True: "ok", False: "FAIL", None: "-"}[ok], why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per probe")
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--long", type=int, default=32768, help="the chunked-path probe (CPU)")
    args = parser.parse_args()
    rows = []
    if args.device == "cpu":
        tokens = args.tokens or 1024
        r = _child("measure_cpu", args.probes, tokens)
        if "error" in r:
            print("CPU measurement failed:", r["error"])
            return 1
        layer = r["one_layer_bytes"]
        ratio = r["rss_added_bytes"] / layer
        rows.append(_row(f"RSS added per event, {args.probes} x {tokens} tokens, 8-layer GQA",
                         f"{r['rss_added_bytes'] / MIB:.0f} MiB = {ratio:.2f} x one layer "
                         f"({layer / MIB:.0f} MiB)", "<= 3 x", ratio <= 3))  # fmt: skip
        first = r["first_rss_added_bytes"]
        rows.append(_row("  the process's first pass (the logger's start-up check)",
                         f"{first / MIB:.0f} MiB = {first / layer:.2f} x", "-", None,
                         "one-time: imports, allocator arenas"))  # fmt: skip
        rows.append(_row("training-thread time of the event", f"{r['stall_s']:.2f} s", "-", None))
        size = r["archive_bytes"]
        rows.append(
            _row("archive per event", f"{size / MIB:.2f} MiB", "<= 16 MiB", size <= 16 * MIB)
        )
        if "write_s" in r:
            html = r["largest_html_bytes"]
            rows.append(_row(f"largest HTML view ({r['html_pages']} pages)",
                             f"{html / MIB:.2f} MiB", "<= 10 MiB", html <= 10 * MIB))  # fmt: skip
            rows.append(_row("writing the event (render + sinks)", f"{r['write_s']:.1f} s",
                             "<= 60 s", r["write_s"] <= 60))  # fmt: skip
        else:
            why = r.get("write_skipped") or r.get("write_error")
            rows.append(_row("writing the event", "not measured", "<= 60 s", None, why))
        if args.long:
            r = _child("measure_long", args.long)
            if "error" in r:
                rows.append(_row(f"{args.long}-token probe", "failed", "few hundred MiB", False,
                                 " ".join(r["error"])))  # fmt: skip
            else:
                mib = r["rss_added_bytes"] / MIB
                rows.append(_row(f"{args.long}-token probe, tiny decoder, chunked",
                                 f"{mib:.0f} MiB added, {r['seconds']:.1f} s",
                                 "<= 500 MiB", mib <= 500))  # fmt: skip
    else:
        tokens = args.tokens or 2048
        r = _child("measure_gpu", args.probes, tokens)
        if "error" in r:
            print("GPU measurement failed:", r["error"])
            return 1
        share = r["event_gpu_bytes"] / r["train_step_bytes"]
        print(f"device: {r['device']}")
        rows.append(_row(f"GPU memory added, {args.probes} x {tokens} tokens, 1.1B bf16",
                         f"{r['event_gpu_bytes'] / MIB:.0f} MiB = {share:.1%} of a training step "
                         f"({r['train_step_bytes'] / MIB:.0f} MiB)", "<= 25 %", share <= 0.25))  # fmt: skip
        rows.append(_row("stall (probe pass + host copy)", f"{r['stall_s']:.2f} s", "<= 0.5 s",
                         r["stall_s"] <= 0.5))  # fmt: skip
        rss = r["rss_added_bytes"]
        rows.append(_row("host RSS added", f"{rss / MIB:.0f} MiB", "<= 1 GiB", rss <= 2**30))
        size = r["archive_bytes"]
        rows.append(
            _row("archive per event", f"{size / MIB:.2f} MiB", "<= 16 MiB", size <= 16 * MIB)
        )
    width = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], width)), row[4])
    failing = [row for row in rows if row[3] == "FAIL"]
    for label, value, goal, _, why in failing:
        print(f"FAILING GOAL: {label}: {value}, goal {goal}" + (f" ({why})" if why else ""))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
