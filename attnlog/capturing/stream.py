"""Streaming reduction: each layer of a probe batch reduced as the model computes it.

A layer is reduced in chunks of query rows (each row is its own softmax, so this is exact), at
most `CHUNK_BYTES` of attention at a time: the model's eager attention runs on each chunk. Above
`chunked_above` tokens the layer's output comes from `sdpa` instead, and the rows from the
queries and keys, mask applied: no `[H, n, n]` and no float n x n mask is made. So memory grows
with one layer, never with the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnlog.capturing.attention import eager_of, scaling_of
from attnlog.capturing.pooling import Blocks, Pooler

__all__ = ["CHUNK_BYTES", "Stream"]

#: float32 bytes of attention rows reduced at once, on the CPU and on an accelerator: bounds a
#: layer's memory; larger on a GPU, where each chunk costs ~100 kernel launches.
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 128 * 2**20}
#: A layer's attention is reduced in chunks of at most 1/LAYER_PARTS of it (above
#: SMALL_CHUNK_BYTES): a chunk's scores, softmax and float32 copies live side by side, so the
#: pass adds well under one layer's attention on top of what the model's forward holds.
LAYER_PARTS = 8
SMALL_CHUNK_BYTES = 8 * 2**20


def chunk_rows(row_elements: int, height: int, device_type: str) -> int:
    """Query rows reduced at once, for rows of `row_elements` float32 values and `height` rows:
    at most CHUNK_BYTES, and at most 1/LAYER_PARTS of the layer when that is more than
    SMALL_CHUNK_BYTES."""
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"])
    layer = 4 * row_elements * height
    budget = min(budget, max(SMALL_CHUNK_BYTES, layer // LAYER_PARTS))
    return max(1, budget // (4 * row_elements))


class Stream:
    """Reduces each layer of one batch forward as the model computes it.

    Per probe `b` of the batch (right-padded to `width` tokens): whole attention `[H, n, n]` per
    layer up to `full_limit` tokens (plus q/k when recorded), a `Pooler` beyond. When every
    probe is short and padding at most doubles the memory (the default probes), the whole
    padded batch is kept per layer instead: a few kernel launches a layer rather than a few per
    probe, which is what a small probe pass on a GPU costs. Every chunk of
    query rows goes to the score accumulator. Up to `chunked_above` tokens the model's own eager
    attention runs on chunks of query rows (exact: each row is its own softmax), so a layer never
    holds more than `CHUNK_BYTES` of attention rows; above it `sdpa` gives the output and the rows
    come from q/k. A failure is kept in `error` and raised after the forward, so the forward (a
    collective under sharded training) runs to its end on every rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        accumulator: Any,
        *,
        full_limit: int,
        pooled_size: int,
        chunked_above: int,
        records_qk: bool,
        wants_logits: bool,
    ) -> None:
        self.lengths = list(lengths)
        self.chunked = max(self.lengths) > chunked_above
        self.accumulator = accumulator
        self.full_limit = full_limit
        self.pooled_size = pooled_size
        self.records_qk = records_qk
        self.wants_logits = wants_logits and accumulator is not None
        self.layers = 0
        self.full: list[list[torch.Tensor]] = [[] for _ in self.lengths]  # per probe, per layer
        self.pooled: list[list[Pooler]] = [[] for _ in self.lengths]
        self.queries: list[list[torch.Tensor]] = [[] for _ in self.lengths]
        self.keys: list[list[torch.Tensor]] = [[] for _ in self.lengths]
        self.spans: list[Any] = [None for _ in self.lengths]
        self.blocks: list[Blocks | None] = [None for _ in self.lengths]
        width = max(self.lengths)
        padded_size = len(self.lengths) * width * width
        self.padded = width <= full_limit and padded_size <= 2 * sum(n * n for n in self.lengths)
        self.batch: dict[str, list[torch.Tensor]] = {"attention": [], "queries": [], "keys": []}
        self.scaling: float | None = None
        self.error: BaseException | None = None

    def layer(self, module, query, key, value, mask, *args, **kwargs):
        """One attention call: the output the model needs, and this layer reduced."""
        layer = self.layers
        self.layers += 1
        scaling = scaling_of(module, query, kwargs)
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        keys = key
        if key.shape[1] != query.shape[1]:  # grouped-query attention: one key head per group
            keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        self._guard(self._start_layer, query, keys, scaling)
        batch, heads, width, _ = query.shape
        rows = chunk_rows(batch * heads * width, width, query.device.type)
        if self.chunked:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            output, _ = sdpa_attention_forward(module, query, key, value, mask, *args, **kwargs)
            for start in range(0, width, rows):
                end = min(width, start + rows)
                logits = _logits(query, keys, mask, start, end, scaling, causal)
                self._guard(self._take, layer, start, logits.softmax(-1), logits)
            return output, None
        eager = eager_of(module)
        outputs = []
        for start in range(0, width, rows):
            end = min(width, start + rows)
            part = None if mask is None or mask.shape[-2] == 1 else mask[:, :, start:end]
            output, weights = eager(module, query[:, :, start:end], key, value,
                                    mask if part is None else part, *args, **kwargs)  # fmt: skip
            outputs.append(output)
            logits = None
            if self.wants_logits and self.error is None:
                logits = _logits(query, keys, mask, start, end, scaling, causal)
            self._guard(self._take, layer, start, weights, logits)
        if len(outputs) == 1:
            return outputs[0], weights
        return torch.cat(outputs, 1), None  # eager gives [B, rows, H, d]

    def _guard(self, fn, *args) -> None:
        if self.error is None:
            try:
                fn(*args)
            except Exception as ex:  # raised after the forward, on every rank
                self.error = ex

    def _start_layer(self, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Room for this layer's whole attention of short probes, a pooler for long ones."""
        self.scaling = scaling
        batch, heads, width, _ = query.shape
        if self.padded:  # every row is written by `_take`
            self.batch["attention"].append(
                query.new_empty(batch, heads, width, width, dtype=torch.float32)
            )
            if self.records_qk:
                self.batch["queries"].append(query.detach().clone())
                self.batch["keys"].append(keys.detach().clone())
            return
        for b, n in enumerate(self.lengths):
            if n <= self.full_limit:
                self.full[b].append(torch.zeros(heads, n, n, device=query.device))
                if self.records_qk:
                    self.queries[b].append(query[b, :, :n].detach().clone())
                    self.keys[b].append(keys[b, :, :n].detach().clone())
            else:
                if self.spans[b] is None:
                    self.blocks[b] = Blocks(n, self.pooled_size, query.device)
                    self.spans[b] = self.blocks[b].spans
                self.pooled[b].append(Pooler(self.blocks[b], heads))

    def _take(self, layer: int, start: int, probs: torch.Tensor, logits: Any) -> None:
        """Rows start.. of every probe ([B, H, r, N]): to the accumulator, then kept as stored."""
        if self.accumulator is not None:
            self.accumulator.add(layer, probs, row_start=start, logits=logits)
        if self.padded:
            self.batch["attention"][-1][:, :, start : start + probs.shape[2]] = probs
            return
        for b, n in enumerate(self.lengths):
            r = min(probs.shape[2], n - start)
            if r <= 0:
                continue
            rows = probs[b, :, :r, :n]
            if n <= self.full_limit:
                self.full[b][-1][:, start : start + r] = rows
            else:
                self.pooled[b][-1].add(rows, start)

    def probe_arrays(self, b: int) -> dict[str, Any]:
        """Probe b's stored arrays: attention `[L, H, n, n]` or pooled `[L, H, m, m]` + spans."""
        n = self.lengths[b]
        if self.padded:  # probe b's part of each layer of the padded batch, stacked
            qk = self.records_qk and bool(self.batch["queries"])

            def stacked(name: str, *index: Any) -> torch.Tensor:
                return torch.stack([layer[(b, slice(None), *index)] for layer in self.batch[name]])

            return {
                "attention": stacked("attention", slice(n), slice(n)),
                "queries": stacked("queries", slice(n)) if qk else None,
                "keys": stacked("keys", slice(n)) if qk else None,
                "scaling": self.scaling if qk else None,
            }
        if n <= self.full_limit:
            qk = self.records_qk and self.queries[b]
            return {
                "attention": torch.stack(self.full[b]),
                "queries": torch.stack(self.queries[b]) if qk else None,
                "keys": torch.stack(self.keys[b]) if qk else None,
                "scaling": self.scaling if qk else None,
            }
        pooled = torch.stack([p.result() for p in self.pooled[b]])
        return {"attention": pooled, "spans": self.spans[b]}


def _logits(query, key, mask, start: int, end: int, scaling: float, causal: bool) -> torch.Tensor:
    """[B, H, r, N] float32 logits of query rows start..end-1: (q . k) * scaling, mask applied.

    Masked positions get the dtype's minimum (as eager does), so a fully masked padding row
    stays finite.
    """
    q = query[:, :, start:end].to(torch.float32)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)) * scaling
    width = key.shape[-2]
    lowest = torch.finfo(torch.float32).min
    if mask is None:
        if causal:
            rows = torch.arange(start, end, device=q.device)[:, None]
            logits = logits.masked_fill(torch.arange(width, device=q.device) > rows, lowest)
        return logits
    chunk = mask[..., :width] if mask.shape[-2] == 1 else mask[:, :, start:end, :width]
    if chunk.dtype == torch.bool:
        return logits.masked_fill(~chunk, lowest)
    return (logits + chunk.to(torch.float32)).clamp_min(lowest)
