"""Run the probes through the live model and reduce its attention layer by layer.

Models usually train with `sdpa` or flash attention, which return no weights. For the probe pass
the model is switched to attnlog's own attention function (registered with transformers'
`AttentionInterface`). It computes each layer as the model's *eager* attention does, and reduces
that layer at once, so memory grows with one layer, never with the whole model:

- the per-head pattern scores go into a `patterns.ScoreAccumulator` (on the device);
- the attention is kept only as it will be stored: whole up to `full_attention_limit` tokens,
  pooled by blocks of tokens to at most `pooled_size` x `pooled_size` beyond;
- query/key vectors (after rotary embeddings; grouped-query keys expanded per head) only for the
  probes that keep whole attention: the neuron view needs them, nothing else does.

A layer is reduced in chunks of query rows (each row is its own softmax, so this is exact), at
most `CHUNK_BYTES` of attention at a time: the model's eager attention runs on each chunk. Above
`chunked_above` tokens the layer's output comes from `sdpa` instead, and the rows from the
queries and keys, mask applied: no `[H, n, n]` and no float n x n mask is made. Encoder-decoder models (BART, T5), models whose attention does not go
through `AttentionInterface`, and transformers before 4.48 take the older path: the model returns
every layer's attention (`output_attentions`) and it is reduced afterwards.

Everything a pass changes (attention implementation, train/eval mode of every module, RNG state)
is restored in `finally`, so training is bit-identical with or without attnlog. One pass runs at
a time in the process. Under sharded training (FSDP, ZeRO-3) every rank runs the pass together;
rank 0 keeps the result, and all ranks agree on success so that a failing rank stalls nobody.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from attnlog.probes import EncodedProbe, ProbeSet, model_max_length
from attnlog.snapshot import ProbeAttention, Snapshot

__all__ = [
    "AttentionUnavailableError",
    "Capturer",
    "capture",
    "is_sharded",
    "probe_pass",
    "unwrap_model",
]

_IMPL_NAME = "attnlog_eager"
#: Probes up to this many tokens keep their whole attention (and q/k); longer ones are pooled.
FULL_ATTENTION_LIMIT = 256
#: Pooled attention of a longer probe has at most this many blocks per axis.
POOLED_SIZE = 256
#: MiB the pooled maps of one event may take (float16, before compression): bounds the archive.
ARCHIVE_MB = 16
#: Batches wider than this many tokens are reduced from q/k in chunks of query rows.
CHUNKED_ABOVE = 1024
#: float32 bytes of attention rows reduced at once, on the CPU and on an accelerator: bounds a
#: layer's memory; larger on a GPU, where each chunk costs ~100 kernel launches.
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 128 * 2**20}

# One probe pass at a time in the whole process. A pass switches the model's attention
# implementation and its train/eval modes, and saves and restores the process-wide RNG state:
# none of that nests across threads. The lock is global rather than per model because the RNG
# state is global; passes are short and rare, so two loggers seldom wait on each other.
_PASS_LOCK = threading.RLock()
# The pass the attention function reports to. A context variable, not a module attribute: a
# forward that runs outside the pass (another thread) sees None and records nothing.
_CURRENT: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar(
    "attnlog_pass", default=None
)


class AttentionUnavailableError(RuntimeError):
    """The model cannot return attention weights for a probe pass."""


def unwrap_model(model: Any) -> Any:
    """The Hugging Face model inside DDP/DataParallel, `torch.compile`, accelerate and PEFT."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            model = model.get_base_model()  # LoRA layers stay inside and stay active
    return model


def is_sharded(model: Any) -> bool:
    """FSDP (1 or 2) and DeepSpeed ZeRO-3 shard parameters across ranks: every rank must join
    the probe forward."""
    first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if first is not None and hasattr(first, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        return True
    return any(
        type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule")
        or any(c.__name__ == "FSDPModule" for c in type(m).__mro__)
        for m in (model, getattr(model, "module", None))
        if m is not None
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# -- the attention function -------------------------------------------------------------------


class _Pass:
    """What one probe pass records. Found by the attention function through `_CURRENT`.

    `calls` gets (module, query, key, scaling) per attention call on the `output_attentions`
    path; `stream` reduces layers as they are computed on the streaming path.
    """

    def __init__(self, ours: bool, record_qk: bool) -> None:
        self.ours = ours  # attnlog's attention function is the model's for this pass
        self.records_qk = ours and record_qk
        self.calls: list[tuple[Any, torch.Tensor, torch.Tensor, float]] = []
        self.stream: _Stream | None = None


def _scaling(module: Any, query: torch.Tensor, kwargs: dict[str, Any]) -> float:
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    return float(query.shape[-1] ** -0.5 if scaling is None else scaling)


def _eager_of(module: Any) -> Any:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise AttentionUnavailableError(
            f"{type(module).__name__} has no eager attention function to take weights from"
        )
    return eager


def _attention_function(module, query, key, value, attention_mask, *args, **kwargs):
    """Registered with transformers' AttentionInterface: the model's eager attention, reduced."""
    current = _CURRENT.get()
    if current is not None and current.stream is not None:
        return current.stream.layer(module, query, key, value, attention_mask, *args, **kwargs)
    if current is not None and current.records_qk:
        scaling = _scaling(module, query, kwargs)
        current.calls.append((module, query.detach(), key.detach(), scaling))
    return _eager_of(module)(module, query, key, value, attention_mask, *args, **kwargs)


def _mask_function(*args, **kwargs):
    """Masks for attnlog's attention: eager's, or sdpa's (None or bool, no float n x n) when the
    batch is reduced in chunks."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    current = _CURRENT.get()
    chunked = current is not None and current.stream is not None and current.stream.chunked
    return (sdpa_mask if chunked else eager_mask)(*args, **kwargs)


@functools.cache
def _register_attention_function() -> bool:
    """Register attnlog's attention function; False on transformers without AttentionInterface.

    `register` is public and only updates a mapping, so registering again is harmless; cached
    so it runs once per process.
    """
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(_IMPL_NAME, _attention_function)
    try:  # transformers >= 4.53 builds masks per implementation
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return True
    AttentionMaskInterface.register(_IMPL_NAME, _mask_function)
    return True


@contextlib.contextmanager
def probe_pass(model: torch.nn.Module, *, record_qk: bool = True) -> Iterator[_Pass]:
    """Eval mode, no grad, attnlog's attention; everything restored afterwards. One at a time.

    Yields the pass; its `ours` says whether attnlog's attention function is in use (it needs
    transformers' AttentionInterface and `set_attn_implementation`).
    """
    with _PASS_LOCK:
        modes = [(m, m.training) for m in model.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        config = getattr(model, "config", None)
        previous = getattr(config, "_attn_implementation", None)
        ours = _register_attention_function() and hasattr(model, "set_attn_implementation")
        current = _Pass(ours, record_qk)
        token = _CURRENT.set(current)
        switched = False
        try:
            if ours:
                model.set_attn_implementation(_IMPL_NAME)
                switched = True
            elif previous not in (None, "eager"):
                if hasattr(model, "set_attn_implementation"):
                    model.set_attn_implementation("eager")
                else:
                    config._attn_implementation = "eager"
                switched = True
            model.eval()
            with torch.no_grad():
                yield current
        finally:
            _CURRENT.reset(token)
            if switched:
                if hasattr(model, "set_attn_implementation") and previous is not None:
                    model.set_attn_implementation(previous)
                else:
                    config._attn_implementation = previous
            for module, training in modes:
                module.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


# -- streaming reduction ----------------------------------------------------------------------


class _Blocks:
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


class _Pooler:
    """Attention of one long probe pooled by `_Blocks`, fed rows at a time: pooled[b, c] is the
    mean over block b's query rows of the summed attention on block c's keys (rows sum to 1)."""

    def __init__(self, blocks: _Blocks, heads: int) -> None:
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
    blocks = _Blocks(attention.shape[-1], size, attention.device)
    layers = []
    for layer in attention:
        pooler = _Pooler(blocks, layer.shape[0])
        pooler.add(layer, 0)
        layers.append(pooler.result())
    return torch.stack(layers), blocks.spans


def span_labels(tokens: Sequence[str], spans: Any) -> list[str]:
    """Text of each pooled block: its token, or its first and last token."""
    labels = []
    for start, end in spans.tolist():
        labels.append(tokens[start] if end - start == 1 else f"{tokens[start]}…{tokens[end - 1]}")
    return labels


class _Stream:
    """Reduces each layer of one batch forward as the model computes it.

    Per probe `b` of the batch (right-padded to `width` tokens): whole attention `[H, n, n]` per
    layer up to `full_limit` tokens (plus q/k when recorded), a `_Pooler` beyond. When every
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
        self.pooled: list[list[_Pooler]] = [[] for _ in self.lengths]
        self.queries: list[list[torch.Tensor]] = [[] for _ in self.lengths]
        self.keys: list[list[torch.Tensor]] = [[] for _ in self.lengths]
        self.spans: list[Any] = [None for _ in self.lengths]
        self.blocks: list[_Blocks | None] = [None for _ in self.lengths]
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
        scaling = _scaling(module, query, kwargs)
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        keys = key
        if key.shape[1] != query.shape[1]:  # grouped-query attention: one key head per group
            keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        self._guard(self._start_layer, query, keys, scaling)
        batch, heads, width, _ = query.shape
        budget = CHUNK_BYTES.get(query.device.type, CHUNK_BYTES["cuda"])
        rows = max(1, budget // (4 * batch * heads * width))
        if self.chunked:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            output, _ = sdpa_attention_forward(module, query, key, value, mask, *args, **kwargs)
            for start in range(0, width, rows):
                end = min(width, start + rows)
                logits = _logits(query, keys, mask, start, end, scaling, causal)
                self._guard(self._take, layer, start, logits.softmax(-1), logits)
            return output, None
        eager = _eager_of(module)
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
                    self.blocks[b] = _Blocks(n, self.pooled_size, query.device)
                    self.spans[b] = self.blocks[b].spans
                self.pooled[b].append(_Pooler(self.blocks[b], heads))

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


# -- the capturer -----------------------------------------------------------------------------


class Capturer:
    """Prepared once per logger: probes tokenised, model checked; `measure(step)` captures.

    Args:
        model: a Hugging Face model (wrappers are unwrapped at every call, so the live
            trained weights are used). FSDP/ZeRO-3 sharded models work when every rank calls.
        tokenizer: the model's tokenizer.
        probes: probe values, a ProbeSet, a file path or None for the defaults.
        max_length: longest probe in tokens (default: what the model accepts).
        on_long: "truncate" (warn) or "error" for over-long probes.
        batch_size: probes per forward pass (None: all in one padded batch).
        record_qk: keep query/key vectors (for the neuron view) of probes with whole attention.
        full_attention_limit: probes up to this many tokens keep their whole attention; longer
            ones keep it pooled by blocks (the scores stay exact).
        pooled_size: most blocks per axis of a pooled attention map; fewer when the pooled
            maps of all long probes would pass `archive_mb` (float16, before compression).
        archive_mb: what the stored attention of one event may take, in MiB (default 16).
        chunked_above: batches wider than this many tokens are reduced in chunks of query rows
            from q/k, with `sdpa` computing the model's output (no n x n in memory).
        induction_probe: add the built-in induction probe for causal models.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: Any = None,
        *,
        max_length: int | None = None,
        on_long: str = "truncate",
        batch_size: int | None = None,
        record_qk: bool = True,
        full_attention_limit: int = FULL_ATTENTION_LIMIT,
        pooled_size: int = POOLED_SIZE,
        archive_mb: float = ARCHIVE_MB,
        chunked_above: int = CHUNKED_ABOVE,
        induction_probe: bool = True,
    ) -> None:
        if tokenizer is None:
            raise ValueError("attnlog needs the model's tokenizer to encode the probes")
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("full_attention_limit", full_attention_limit),
            ("pooled_size", pooled_size),
            ("chunked_above", chunked_above),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be at least 1, got {value} (or leave it out)")
        self.model = model
        self.tokenizer = tokenizer
        inner = unwrap_model(model)
        config = getattr(inner, "config", None)
        if config is None:
            raise TypeError(
                f"{type(inner).__name__} is not a Hugging Face model (no .config); attnlog "
                "captures attention from transformers models"
            )
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.causal = _is_causal(config)
        self.probe_set = ProbeSet.coerce(probes)
        if induction_probe and self.causal:
            self.probe_set = _with_induction_probe(self.probe_set, tokenizer)
        limit = model_max_length(tokenizer, config)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} is more than the model accepts ({limit})")
        self.encoded = self.probe_set.encode(
            tokenizer, max_length=max_length or limit, on_long=on_long
        )
        self.batch_size = batch_size or len(self.encoded)
        self.record_qk = record_qk
        self.full_attention_limit = full_attention_limit
        if not archive_mb > 0:
            raise ValueError(f"archive_mb must be more than 0, got {archive_mb!r}")
        self.pooled_size = _pooled_size(
            pooled_size,
            archive_mb,
            config,
            sum(len(p) > full_attention_limit for p in self.encoded),
        )
        self.chunked_above = chunked_above
        self._streams = True  # False once a model's attention is seen not to use our function
        self._contexts: dict[str, list[Any]] = {}
        self._check_vocabulary(inner)

    @property
    def sharded(self) -> bool:
        """True under FSDP/ZeRO-3: every rank must call `measure` at the same steps."""
        return is_sharded(self.model)

    def _check_vocabulary(self, model: Any) -> None:
        embeddings = (
            model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        )
        size = getattr(embeddings, "num_embeddings", None)
        if size is None:
            return
        top = max(int(p.input_ids.max()) for p in self.encoded)
        if top >= size:
            raise ValueError(
                f"the tokenizer gives token id {top} but the model has only {size} embeddings: "
                "tokenizer and model do not match. If you added tokens, call "
                "model.resize_token_embeddings(len(tokenizer))"
            )

    def check(self) -> Snapshot:
        """One probe pass at start-up: fails fast if the model cannot return attention."""
        try:
            snapshot = self(step=-1)
        except TypeError as ex:
            if "output_attentions" not in str(ex):
                raise
            name = type(unwrap_model(self.model)).__name__
            raise AttentionUnavailableError(
                f"{name} has no attention weights to return (its forward takes no "
                "output_attentions); attnlog needs a transformer with attention layers"
            ) from ex
        if not snapshot.probes or snapshot.probes[0].attention is None:
            raise AttentionUnavailableError("the model returned no attention weights")
        return snapshot

    def __call__(self, step: int = 0) -> Snapshot:
        """One probe pass → Snapshot on the training device (for one-shot callers)."""
        return self._capture(step, None, scores=False)[0]

    def measure(
        self, step: int, patterns: Sequence[str] | None = None, *, scores: bool = True
    ) -> tuple[Snapshot | None, Any]:
        """One probe pass → (host Snapshot, ScoreTable or None): what the logger hands off.

        This is the training process's whole share of a logging event: the forward with its
        layer-by-layer reduction, one device→host copy. With `scores=False` the table is None
        when every probe kept its whole attention (the writer can score it); pooled probes are
        scored in the pass regardless. Under sharded training every rank must call this at the
        same step; ranks other than 0 get (None, None).
        """
        snapshot, table = self._capture(step, patterns, scores=scores)
        if _rank() != 0:
            return None, None
        if table is None:  # the writer scores it: float32, so scores are not rounded to float16
            import numpy as np

            return snapshot.to_host(np.float32), None
        return snapshot.to_host(), table

    # -- one pass ----------------------------------------------------------------------------

    def _capture(self, step: int, patterns: Sequence[str] | None, *, scores: bool):
        model = unwrap_model(self.model)
        sharded = is_sharded(model)
        error: BaseException | None = None
        probes: list[ProbeAttention] = []
        tables: list[Any] = []
        try:
            with probe_pass(model, record_qk=self.record_qk) as current:
                for start in range(0, len(self.encoded), self.batch_size):
                    chunk = self.encoded[start : start + self.batch_size]
                    if self.is_encoder_decoder:
                        probes.extend(self._run_seq2seq(model, p, current) for p in chunk)
                    elif current.ours and self._streams:
                        done = self._run_stream(model, chunk, current, patterns, scores, sharded)
                        if done is None:  # the model's attention never called ours
                            self._streams = False
                            probes.extend(self._run_batch(model, chunk, current, sharded))
                        else:
                            probes.extend(done[0])
                            tables.append(done[1])
                    else:
                        probes.extend(self._run_batch(model, chunk, current, sharded))
        except Exception as ex:
            if not sharded:
                raise
            error = ex
        if sharded:
            _agree(error, _model_device(model))
        snapshot = Snapshot(
            step=step,
            probes=probes,
            model_type=str(getattr(model.config, "model_type", "")),
            meta={"causal": self.causal, "encoder_decoder": self.is_encoder_decoder},
        )
        return self._finish(snapshot, tables, patterns, scores)

    def _finish(self, snapshot: Snapshot, tables: list[Any], patterns, scores: bool):
        """Score what the pass did not score; pool whole attention too long to store whole."""
        from attnlog import patterns as pattern_registry

        contexts = next(iter(self._contexts.values()), [])
        table = _merge_tables(tables, snapshot.step, contexts)
        too_long = any(len(p) > self.full_attention_limit for p in snapshot.probes)
        whole = [p for p in snapshot.probes if not p.pooled]
        if table is None and (scores or too_long) and whole:  # the output_attentions path
            table = pattern_registry.score(whole, patterns, step=snapshot.step)
        probes = []
        for p in snapshot.probes:
            if not p.pooled and len(p) > self.full_attention_limit:
                pooled, spans = pool_attention(p.attention, self.pooled_size)
                p = ProbeAttention(**{**vars(p), "attention": pooled, "spans": spans,
                                      "queries": None, "keys": None})  # fmt: skip
            if p.pooled and p.labels is None:
                p.labels = span_labels(p.tokens, p.spans)
            probes.append(p)
        snapshot.probes = probes
        return snapshot, table

    # -- forward passes ----------------------------------------------------------------------

    def _batch_inputs(self, chunk: Sequence[EncodedProbe], device) -> dict[str, torch.Tensor]:
        """Right-padded batch: valid tokens keep positions 0..n-1, as in an unpadded pass."""
        width = max(len(p) for p in chunk)
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        types = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, : len(p)] = torch.from_numpy(p.input_ids)
            mask[row, : len(p)] = 1
            if p.token_type_ids is not None:
                types[row, : len(p)] = torch.from_numpy(p.token_type_ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if any(p.token_type_ids is not None for p in chunk):
            inputs["token_type_ids"] = types
        return {k: v.to(device) for k, v in inputs.items()}

    def _forward(self, model, chunk: Sequence[EncodedProbe], sharded: bool, **options):
        return self._call(*self._inputs(model, chunk, sharded), **options)

    def _inputs(self, model, chunk: Sequence[EncodedProbe], sharded: bool):
        """(module to call, its inputs). Sharded models run from their root, whose forward
        gathers the root's own parameters; others from the body, so no logits over a large
        vocabulary are computed."""
        body = model if sharded else _body(model)
        inputs = self._batch_inputs(chunk, _model_device(model))
        if "token_type_ids" in inputs and not _accepts(body, "token_type_ids"):
            del inputs["token_type_ids"]
        if _accepts(body, "use_cache"):
            inputs["use_cache"] = False
        return body, inputs

    @staticmethod
    def _call(body, inputs, **options):
        return body(**inputs, return_dict=True, **options)

    def _run_stream(self, model, chunk, current: _Pass, patterns, scores: bool, sharded: bool):
        """One batch forward through attnlog's attention → (probes, ScoreTable or None).

        None when the model's attention never called attnlog's function (then the caller takes
        the output_attentions path). Sharded: all ranks agree before the forward (a rank that
        could not prepare must not leave the others waiting in its all-gathers) and after it.
        """
        device = _model_device(model)
        error = stream = call = None
        try:
            lengths = [len(p) for p in chunk]
            # One long probe anywhere: the event's table comes from the pass, for every batch.
            long = any(len(p) > self.full_attention_limit for p in self.encoded)
            accumulator = None
            if scores or long:
                accumulator = self._accumulator(model, chunk, patterns, device)
            stream = _Stream(
                lengths,
                accumulator,
                full_limit=self.full_attention_limit,
                pooled_size=self.pooled_size,
                chunked_above=self.chunked_above,
                records_qk=self.record_qk and current.records_qk,
                wants_logits=patterns is None or "max_logit" in patterns,
            )
            call = self._inputs(model, chunk, sharded)
        except Exception as ex:
            error = ex
        _settle(error, sharded, device)
        current.stream = stream
        try:
            self._call(*call)
        finally:
            current.stream = None
        _settle(stream.error, sharded, device)
        if stream.layers == 0:
            return None
        probes = [self._probe(p, **stream.probe_arrays(b)) for b, p in enumerate(chunk)]
        table = accumulator.table(0) if accumulator is not None else None
        return probes, table

    def _accumulator(self, model, chunk, patterns, device) -> Any:
        from attnlog import patterns as pattern_registry

        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        key = str(device)
        if key not in self._contexts:
            self._contexts = {key: [_context(p, self.causal, device) for p in self.encoded]}
        index = {id(p): i for i, p in enumerate(self.encoded)}
        contexts = [self._contexts[key][index[id(p)]] for p in chunk]
        make = getattr(pattern_registry, "ScoreAccumulator", None)
        if make is None:  # an attnlog.patterns without the row-wise engine
            return None
        return make(
            contexts,
            patterns,
            int(text.num_hidden_layers),
            int(text.num_attention_heads),
            device,
            names=[p.name for p in chunk],
        )

    def _run_batch(self, model, chunk: Sequence[EncodedProbe], current: _Pass, sharded: bool):
        """The output_attentions path: every layer's whole attention, reduced afterwards."""
        outputs = self._forward(model, chunk, sharded, output_attentions=True)
        attentions = _nonempty(getattr(outputs, "attentions", None), type(model).__name__)
        queries, keys, scaling = self._stack_qk(current, len(attentions))
        result = []
        for row, p in enumerate(chunk):
            n = len(p)
            result.append(
                self._probe(
                    p,
                    attention=torch.stack([a[row, :, :n, :n] for a in attentions]),
                    queries=None if queries is None else queries[:, row, :, :n],
                    keys=None if keys is None else keys[:, row, :, :n],
                    scaling=scaling,
                )
            )
        return result

    def _run_seq2seq(self, model, p: EncodedProbe, current: _Pass) -> ProbeAttention:
        """Encoder–decoder: the decoder reads the probe shifted right (teacher forcing)."""
        device = _model_device(model)
        config = model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "bos_token_id", None) or 0
        ids = torch.from_numpy(p.input_ids).unsqueeze(0).to(device)
        decoder_ids = torch.cat([torch.tensor([[start]], device=device), ids[:, :-1]], dim=1)
        body = _body(model)
        outputs = body(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            decoder_input_ids=decoder_ids,
            output_attentions=True,
            return_dict=True,
            use_cache=False,
        )
        name = type(model).__name__
        encoder = _nonempty(outputs.encoder_attentions, name)
        decoder = _nonempty(outputs.decoder_attentions, name)
        cross = _nonempty(outputs.cross_attentions, name)
        encoder_modules = (
            set(map(id, model.get_encoder().modules())) if current.records_qk else set()
        )
        queries, keys, scaling = self._stack_qk(
            current, len(encoder), keep=lambda m: id(m) in encoder_modules
        )
        return self._probe(
            p,
            attention=torch.stack([a[0] for a in encoder]),
            queries=None if queries is None else queries[:, 0],
            keys=None if keys is None else keys[:, 0],
            scaling=scaling,
            decoder_tokens=self.tokenizer.convert_ids_to_tokens(decoder_ids[0].tolist()),
            decoder_attention=torch.stack([a[0] for a in decoder]),
            cross_attention=torch.stack([a[0] for a in cross]),
        )

    def _stack_qk(self, current: _Pass, num_layers: int, keep=None):
        """Recorded calls → queries, keys `[L, B, H, n, d]` (keys expanded per query head)."""
        calls = [c for c in current.calls if keep is None or keep(c[0])]
        current.calls.clear()
        if not (self.record_qk and current.records_qk) or len(calls) != num_layers:
            return None, None, None
        queries, keys = [], []
        for _, q, k, _ in calls:
            if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head per group
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            queries.append(q)
            keys.append(k)
        return torch.stack(queries), torch.stack(keys), calls[0][3]

    def _probe(self, p: EncodedProbe, **arrays) -> ProbeAttention:
        # The token masks stay small CPU tensors: scoring derives its masks on the CPU anyway,
        # and a host copy of them would cost a GPU one synchronisation each.
        def tensor(values):
            return None if values is None else torch.tensor(values)

        return ProbeAttention(
            name=p.name,
            tokens=list(p.tokens),
            special=tensor(p.special),
            punct=tensor(p.punct),
            segment=tensor(p.segment),
            token_ids=tensor(p.input_ids),
            word_ids=tensor(p.word_ids),
            causal=self.causal,
            is_pair=p.is_pair,
            **arrays,
        )


def capture(
    model: Any, tokenizer: Any, probes: Any = None, *, step: int = 0, **options
) -> Snapshot:
    """One-shot capture: `capture(model, tokenizer, ["The cat sat."])` → Snapshot.

    For repeated captures (a logger), build a `Capturer` once and call it. Only the given
    probes are captured (pass `induction_probe=True` to add the built-in one).
    """
    options.setdefault("induction_probe", False)
    return Capturer(model, tokenizer, probes, **options)(step)


# -- helpers ---------------------------------------------------------------------------------


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _settle(error: BaseException | None, sharded: bool, device: Any) -> None:
    """Raise `error`; sharded, on every rank if any rank had one."""
    if sharded:
        _agree(error, device)
    elif error is not None:
        raise error


def _agree(error: BaseException | None, device: Any) -> None:
    """All ranks learn whether every rank's pass succeeded; each raises if one failed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        ok = torch.tensor([0 if error is not None else 1], device=_collective_device(device))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and int(ok.item()) == 0:
            raise RuntimeError("the probe pass failed on another rank (its error is logged there)")
    if error is not None:
        raise error


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (unchanged outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device(None))
    return box[0]


def _collective_device(device: Any) -> Any:
    """Where a collective's tensors live: NCCL only moves CUDA tensors (this rank's GPU)."""
    if torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _merge_tables(tables: list[Any], step: int, contexts: Sequence[Any]) -> Any:
    """One ScoreTable from the tables of several batches (`batch_size` < number of probes)."""
    from attnlog.patterns import merge_tables

    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    if len(tables) == 1:
        tables[0].step = step
        return tables[0]
    return merge_tables(tables, step, contexts)


def _context(p: EncodedProbe, causal: bool, device: Any) -> Any:
    from attnlog.patterns import PatternContext

    return PatternContext.create(
        len(p),
        tokens=list(p.tokens),
        special=p.special,
        punct=p.punct,
        segment=p.segment,
        token_ids=p.input_ids,
        word_ids=p.word_ids,
        causal=causal,
        is_pair=p.is_pair,
        device=device,
    )


def _pooled_size(size: int, archive_mb: float, config: Any, long_probes: int) -> int:
    """Blocks per axis: at most `size`, and small enough that the float16 pooled maps of all
    long probes, `[L, H, m, m]` each, fit in `archive_mb`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not (long_probes and isinstance(layers, int) and isinstance(heads, int)):
        return size
    fit = int((archive_mb * 2**20 / (2 * layers * heads * long_probes)) ** 0.5)
    return max(1, min(size, fit))


def _with_induction_probe(probe_set: ProbeSet, tokenizer: Any) -> ProbeSet:
    """The probe set plus the built-in induction probe (when attnlog.probes provides it)."""
    from attnlog import probes

    make = getattr(probes, "induction_probe", None)
    if make is None:
        return probe_set
    probe = make(tokenizer)
    if any(p.name == probe.name for p in probe_set):
        return probe_set
    return ProbeSet([*probe_set, probe])


def _is_causal(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False  # the encoder, which is what the scores read, sees both directions
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in architectures):
        return True
    model_type = getattr(config, "model_type", "")
    encoders = {"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta",
                "deberta-v2", "camembert", "mpnet", "xlm", "ernie", "modernbert", "esm"}  # fmt: skip
    return model_type not in encoders


def _body(model: Any) -> Any:
    """The transformer without its task head: no logits over a large vocabulary for probes."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def _accepts(module: Any, name: str) -> bool:
    return _forward_accepts(type(module), name)


@functools.cache
def _forward_accepts(cls: type, name: str) -> bool:
    """Whether `cls.forward` takes `name`; looked up once per class, not at every probe pass."""
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _nonempty(attentions, model_name: str):
    if not attentions or any(a is None for a in attentions):
        raise AttentionUnavailableError(
            f"{model_name} returned no attention weights even with eager attention. attnlog needs "
            "a model whose forward accepts output_attentions=True (most transformers models do; "
            "check that your transformers version supports output_attentions for this model)"
        )
    return attentions
