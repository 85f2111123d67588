"""The naive attention-logging pipeline, done the way the seed blog post does it.

Everything runs synchronously on the training thread, once per logging event:

1. for each probe: tokenize, `model(**inputs, output_attentions=True)` with eager attention
   (switched in for the pass and restored, eval mode + no_grad, train mode restored);
2. bertviz `head_view` and `model_view` with `html_action="return"`, `.data` written to files;
3. one matplotlib figure per layer with one subplot per head (token tick labels), saved as PNG;
4. simple per-head scores computed in numpy loops (mass on [CLS], mass on [SEP], previous token,
   next token, row entropy), averaged over probes;
5. per-metric logging: one `SummaryWriter.add_scalar` and one `mlflow.log_metric` call per
   head-score (MLflow tracking store: sqlite).

It is the baseline that `bench_overhead.py` compares attnlog with, not a
recommendation. Needs bertviz, matplotlib, tensorboard and mlflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCORES = ("cls", "sep", "prev", "next", "entropy")


def head_scores(attn: np.ndarray, tokens: list[str]) -> dict[str, np.ndarray]:
    """[L, H, n, n] → {score: [L, H]}, with the per-head Python loops a notebook would write."""
    layers, heads, n, _ = attn.shape
    sep_idx = [i for i, t in enumerate(tokens) if t == "[SEP]"]
    out = {name: np.zeros((layers, heads)) for name in SCORES}
    for layer in range(layers):
        for head in range(heads):
            a = attn[layer, head]
            out["cls"][layer, head] = float(np.mean(a[:, 0]))
            out["sep"][layer, head] = float(np.mean(a[:, sep_idx].sum(-1))) if sep_idx else 0.0
            out["prev"][layer, head] = float(np.mean([a[i, i - 1] for i in range(1, n)]))
            out["next"][layer, head] = float(np.mean([a[i, i + 1] for i in range(n - 1)]))
            ent = [-(row * np.log(row + 1e-12)).sum() for row in a]
            out["entropy"][layer, head] = float(np.mean(ent))
    return out


def plot_layer(attn_layer: np.ndarray, tokens: list[str], path: Path) -> None:
    """One figure per layer, one subplot per head, token labels on both axes, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = attn_layer.shape[0]
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4, rows * 4), squeeze=False)
    for head in range(heads):
        ax = axes[head // cols, head % cols]
        ax.imshow(attn_layer[head], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(tokens)))
        ax.set_yticks(range(len(tokens)))
        ax.set_xticklabels(tokens, rotation=90, fontsize=6)
        ax.set_yticklabels(tokens, fontsize=6)
        ax.set_title(f"head {head}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


class NaiveLogger:
    """`log(step)` runs the whole naive pipeline synchronously (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: list[tuple[str, str | None]],
        outdir: str | os.PathLike,
        *,
        max_length: int | None = None,
        plot_layers: int | None = None,
    ) -> None:
        import mlflow
        from torch.utils.tensorboard import SummaryWriter

        self.model = model
        self.tokenizer = tokenizer
        self.probes = probes
        self.max_length = max_length
        self.plot_layers = plot_layers  # None: every layer (the memory run plots fewer, see there)
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.outdir / "tb"))
        mlflow.set_tracking_uri(f"sqlite:///{self.outdir / 'mlflow.db'}")
        mlflow.set_experiment("naive")
        self.run = mlflow.start_run()
        self.mlflow = mlflow

    def forward(self) -> list[tuple[np.ndarray, list[str]]]:
        """Each probe alone through the model with eager attention (batch size 1, as bertviz needs)."""
        from bertviz.util import format_attention  # noqa: F401  (the blog imports it; unused)

        model = self.model
        previous = model.config._attn_implementation
        was_training = model.training
        model.set_attn_implementation("eager")
        model.eval()
        results = []
        try:
            with torch.no_grad():
                for text, pair in self.probes:
                    kwargs = {}
                    if self.max_length:
                        kwargs = {"truncation": True, "max_length": self.max_length}
                    inputs = self.tokenizer(text, pair, return_tensors="pt", **kwargs)
                    out = model(**inputs, output_attentions=True)
                    tokens = self.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
                    results.append((out.attentions, tokens))
        finally:
            model.set_attn_implementation(previous)
            model.train(was_training)
        return results

    def log(self, step: int) -> None:
        from bertviz import head_view, model_view

        captured = self.forward()
        per_probe = []
        for p, (attentions, tokens) in enumerate(captured):
            folder = self.outdir / f"step_{step:08d}" / f"probe_{p}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "head_view.html").write_text(
                head_view(attentions, tokens, html_action="return").data, encoding="utf-8"
            )
            (folder / "model_view.html").write_text(
                model_view(attentions, tokens, html_action="return").data, encoding="utf-8"
            )
            attn = torch.stack([a[0] for a in attentions]).numpy()  # [L, H, n, n]
            for layer in range(attn.shape[0])[: self.plot_layers]:
                plot_layer(attn[layer], tokens, folder / f"layer_{layer}.png")
            per_probe.append(head_scores(attn, tokens))
        for name in SCORES:
            mean = np.mean([s[name] for s in per_probe], axis=0)
            for layer in range(mean.shape[0]):
                for head in range(mean.shape[1]):
                    key = f"{name}/L{layer}H{head}"
                    value = float(mean[layer, head])
                    self.writer.add_scalar(key, value, step)
                    self.mlflow.log_metric(key.replace("/", "."), value, step=step)

    def close(self) -> None:
        self.writer.close()
        self.mlflow.end_run()
