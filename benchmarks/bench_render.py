"""Rendering cost and HTML size against the usual tools.

    python benchmarks/bench_render.py

Prints: render_model (12 layers x 12 heads x 32 tokens) vs a matplotlib subplot grid saved to
PNG, and the bytes of attnlog's head/model view per probe vs bertviz's `html_action='return'`
output for the same attention, and the size cap on a 512-token probe (what an uncapped page
would weigh, what the capped one weighs, how long it takes). Needs matplotlib and bertviz (test
extras); runs in about a minute.
"""

from __future__ import annotations

import io
import time

import numpy as np

from attnlog.render.heatmap import render_layer, render_model
from attnlog.render.html import head_view, model_view
from attnlog.snapshot import ProbeAttention


def softmax_attention(rng, *shape):
    logits = rng.normal(scale=2.5, size=shape)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float16)


def best_of(fn, repeat):
    fn()  # warm-up: fonts, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matplotlib_grid(attn, tokens):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = attn.shape[:2]
    fig, axes = plt.subplots(layers, heads, figsize=(heads * 1.5, layers * 1.5), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(attn[layer, head].astype(np.float32), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def probe(rng, layers, heads, n):
    tokens = ["[CLS]"] + [f"tok{i}" for i in range(n - 2)] + ["[SEP]"]
    return ProbeAttention(
        name="bench",
        tokens=tokens,
        attention=softmax_attention(rng, layers, heads, n, n),
        special=np.zeros(n, bool),
        punct=np.zeros(n, bool),
        segment=np.zeros(n, int),
        token_ids=np.arange(n),
    )


def main() -> None:
    rng = np.random.default_rng(0)
    p = probe(rng, 12, 12, 32)
    t_ours = best_of(lambda: render_model(p.attention, p.tokens, title="bench"), 10)
    t_layer = best_of(lambda: render_layer(p.attention[0], p.tokens, title="bench"), 10)
    t_mpl = best_of(lambda: matplotlib_grid(p.attention, p.tokens), 2)
    print("image rendering, 12 layers x 12 heads x 32 tokens (median)")
    print(f"  {'attnlog render_model':34s} {t_ours * 1e3:8.1f} ms")
    print(f"  {'attnlog render_layer (12 heads)':34s} {t_layer * 1e3:8.1f} ms")
    print(f"  {'matplotlib subplots + savefig PNG':34s} {t_mpl * 1e3:8.1f} ms")
    print(f"  {'ratio attnlog / matplotlib':34s} {t_ours / t_mpl:8.3f}")

    import torch
    from bertviz import head_view as bv_head
    from bertviz import model_view as bv_model

    print("\nHTML bytes per probe (attnlog includes ~125 kB of inlined JS; bertviz loads a CDN)")
    print(f"  {'L x H x n':14s} {'view':6s} {'attnlog':>11s} {'bertviz':>12s} {'ratio':>7s}")
    for layers, heads, n in ((2, 4, 10), (6, 12, 20), (6, 12, 32), (12, 12, 32), (12, 12, 128)):
        p = probe(rng, layers, heads, n)
        attentions = [torch.from_numpy(a[None].astype(np.float32)) for a in p.attention]
        for name, ours, theirs in (("head", head_view, bv_head), ("model", model_view, bv_model)):
            a = len(ours(p).encode())
            b = len(theirs(attentions, p.tokens, html_action="return").data.encode())
            shape = f"{layers}x{heads}x{n}"
            print(f"  {shape:14s} {name:6s} {a:11,d} {b:12,d} {a / b:7.3f}")

    from attnlog.render.event import MAX_HTML_BYTES, probe_views

    print("\nHTML size cap (12 x 12 heads x 512 tokens, head + model view)")
    p = probe(rng, 12, 12, 512)
    uncapped = 300_000 + 8 / 3 * p.attention.size
    start = time.perf_counter()
    files = probe_views(p, 0, ("head", "model"))
    took = time.perf_counter() - start
    biggest = max(len(page.encode()) for page in files.values())
    print(f"  {'uncapped view (estimate)':34s} {uncapped / 2**20:8.1f} MiB")
    print(
        f"  {'capped view':34s} {biggest / 2**20:8.1f} MiB (cap {MAX_HTML_BYTES / 2**20:.0f} MiB)"
    )
    print(f"  {'time for both views':34s} {took * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
