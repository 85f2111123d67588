"""Attention of long probes pooled by blocks of tokens, so the archive stays bounded.

A probe longer than `full_attention_limit` tokens keeps its attention as at most
`pooled_size` x `pooled_size` blocks per head: pooled[b, c] is the mean over block b's query
rows of the summed attention on block c's keys, so each pooled row still sums to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["POOLED_SIZE", "pool_attention", "span_labels"]

#: Pooled attention of a longer probe has at most this many blocks per axis.
POOLED_SIZE = 256


class Blocks:
    """How `n` tokens split into at most `size` blocks: block b covers tokens
    `spans[b, 0] <= i < spans[b, 1]`. Made once per probe and pass (on the CPU, then moved once:
    building it on a GPU would synchronise at every layer)."""

    def __init__(self, n: int, size: int, device: Any) -> None:
        m = min(n, size)
        block = torch.arange(n) * m // n  # [n] block of each token
        counts = torch.bincount(block, minlength=m)
        ends = torch.cumsum(counts, 0)
        self.spans = torch.stack([ends - counts, ends], 1)  # [m, 2], on the CPU
        self.block = block.to(device)
        self.counts = counts.to(device, torch.float32)


class Pooler:
    """Attention of one long probe pooled by `Blocks`, fed rows at a time."""

    def __init__(self, blocks: Blocks, heads: int) -> None:
        self.blocks = blocks
        m = len(blocks.counts)
        self.sum = torch.zeros(heads, m, m, device=blocks.block.device)

    def add(self, rows: torch.Tensor, row_start: int) -> None:
        """rows: [H, r, n] attention of query rows row_start .. row_start + r - 1."""
        block = self.blocks.block
        by_key = torch.zeros(rows.shape[0], rows.shape[1], self.sum.shape[-1], device=rows.device)
        by_key.index_add_(2, block, rows.to(torch.float32))
        self.sum.index_add_(1, block[row_start : row_start + rows.shape[1]], by_key)

    def result(self) -> torch.Tensor:
        """[H, m, m] float32."""
        return self.sum / self.blocks.counts[None, :, None]


def pool_attention(attention: torch.Tensor, size: int = POOLED_SIZE) -> tuple[Any, Any]:
    """Whole attention `[L, H, n, n]` pooled to `[L, H, m, m]`; returns (pooled, spans [m, 2])."""
    blocks = Blocks(attention.shape[-1], size, attention.device)
    layers = []
    for layer in attention:
        pooler = Pooler(blocks, layer.shape[0])
        pooler.add(layer, 0)
        layers.append(pooler.result())
    return torch.stack(layers), blocks.spans


def span_labels(tokens: Sequence[str], spans: Any) -> list[str]:
    """Text of each pooled block: its token, or its first and last token."""
    labels = []
    for start, end in spans.tolist():
        labels.append(tokens[start] if end - start == 1 else f"{tokens[start]}…{tokens[end - 1]}")
    return labels
