"""`Capturer`: probes prepared once, then one probe pass per logging event.

The pass streams when it can: attnlog's attention function hands each layer to a `Stream`,
which keeps attention only as it will be stored (whole up to `full_attention_limit` tokens,
pooled beyond) and scores the pooled probes as their rows go by, the only place their whole
attention exists. Short probes leave the pass whole and are scored by the writer, off the
training process. One pass runs at a time in the process. Under sharded training (FSDP,
ZeRO-3) every rank runs the pass together; rank 0 keeps the result, and all ranks agree on
success so that a failing rank stalls nobody.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from attnlog.capturing import batches
from attnlog.capturing.attention import Pass, probe_pass
from attnlog.capturing.budget import plan_storage
from attnlog.capturing.distributed import agree, rank, settle
from attnlog.capturing.models import (
    AttentionUnavailableError,
    is_causal,
    is_sharded,
    model_device,
    text_config,
    unwrap_model,
)
from attnlog.capturing.options import CaptureOptions
from attnlog.capturing.pooling import pool_attention, span_labels
from attnlog.capturing.stream import Stream
from attnlog.probes import EncodedProbe, ProbeSet, builtin_induction_probe, model_max_length
from attnlog.snapshot import ProbeAttention, Snapshot

__all__ = ["Capturer", "capture"]


class Capturer:
    """Prepared once per logger: probes tokenised, model checked; `measure(step)` captures.

    Args:
        model: a Hugging Face model (wrappers are unwrapped at every call, so the live
            trained weights are used). FSDP/ZeRO-3 sharded models work when every rank calls.
        tokenizer: the model's tokenizer.
        probes: probe values, a ProbeSet, a file path or None for the defaults.
        options: a `CaptureOptions`, or its fields as keywords (`batch_size=4`, ...).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probes: Any = None,
        options: CaptureOptions | None = None,
        **keywords: Any,
    ) -> None:
        if options is None:
            options = CaptureOptions.create(keywords, "Capturer")
        elif keywords:
            options = CaptureOptions(**{**vars(options), **keywords})
        self.options = options
        if tokenizer is None:
            raise ValueError("attnlog needs the model's tokenizer to encode the probes")
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
        self.causal = is_causal(config)
        self.probe_set = ProbeSet.coerce(probes)
        if options.induction_probe and self.causal:
            self.probe_set = _with_induction_probe(self.probe_set, tokenizer)
        self.encoded = self._encode(config)
        self.chunked_above = options.chunked_above
        self.batches = _batches(self.encoded, options.batch_size, options.chunked_above)
        self.storage = plan_storage([len(p) for p in self.encoded], config, options)
        for note in self.storage.notes:
            warnings.warn(note, stacklevel=3)
        self.full_attention_limit = self.storage.full_limit
        self.pooled_size = self.storage.pooled_size
        self.record_qk = bool(self.storage.qk)
        self._streams = True  # False once a model's attention is seen not to use our function
        self._contexts: dict[str, list[Any]] = {}
        self._checked: tuple | None = None  # (weights, patterns, measured) of `check`
        self._check_vocabulary(inner)

    def _encode(self, config: Any) -> list[EncodedProbe]:
        max_length = self.options.max_length
        limit = model_max_length(self.tokenizer, config)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} is more than the model accepts ({limit})")
        return self.probe_set.encode(
            self.tokenizer, max_length=max_length or limit, on_long=self.options.on_long
        )

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

    def check(self, patterns: Sequence[str] | None = None) -> Snapshot:
        """One probe pass at start-up: fails fast if the model cannot return attention.

        What it captured is kept for the first `measure` (with these `patterns`), which takes
        it instead of a second pass while the weights have not changed: a Trainer logs step 0
        right after the logger is built (a forward of every probe, 70 ms of MiniLM on 2 cores).
        """
        try:
            snapshot, table = self._capture(-1, patterns, scores=False)
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
        if not self.sharded and rank() == 0:  # sharded ranks must all make every pass
            self._checked = (_weights(self.model), patterns, self._handed(snapshot, table))
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
        when every probe kept its whole attention (the writer scores it); pooled probes are
        scored in the pass regardless. Under sharded training every rank must call this at the
        same step; ranks other than 0 get (None, None).
        """
        checked, self._checked = self._checked, None
        if checked is not None and not scores and checked[:2] == (_weights(self.model), patterns):
            snapshot, table = checked[2]
            if table is not None:
                table.step = step
            return replace(snapshot, step=step), table
        snapshot, table = self._capture(step, patterns, scores=scores)
        if rank() != 0:
            return None, None
        return self._handed(snapshot, table)

    @staticmethod
    def _handed(snapshot: Snapshot, table: Any) -> tuple[Snapshot, Any]:
        """What `measure` hands over: host copies, float32 when the writer scores them (so
        scores are not rounded to float16)."""
        if table is None:
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
                for chunk in self.batches:
                    self._run(model, chunk, current, patterns, scores, sharded, probes, tables)
        except Exception as ex:
            if not sharded:
                raise
            error = ex
        if sharded:
            agree(error, model_device(model))
        snapshot = Snapshot(
            step=step,
            probes=probes,
            model_type=str(getattr(model.config, "model_type", "")),
            meta={"causal": self.causal, "encoder_decoder": self.is_encoder_decoder},
        )
        return self._finish(snapshot, tables, patterns, scores)

    def _run(self, model, chunk, current: Pass, patterns, scores, sharded, probes, tables):
        """One batch of probes through the path the model allows; results appended."""
        qk = self.record_qk
        if self.is_encoder_decoder:
            probes.extend(batches.run_seq2seq(model, self.tokenizer, p, current, qk) for p in chunk)
            return
        if current.ours and self._streams:
            done = self._run_stream(model, chunk, current, patterns, scores, sharded)
            if done is not None:
                probes.extend(done[0])
                tables.append(done[1])
                return
            self._streams = False  # the model's attention never called ours
        probes.extend(
            batches.run_batch(
                model, self.tokenizer, chunk, current, sharded, causal=self.causal, qk=qk
            )
        )

    def _finish(self, snapshot: Snapshot, tables: list[Any], patterns, scores: bool):
        """Score what the pass did not score; pool whole attention too long to store whole."""
        from attnlog.patterns import score

        contexts = next(iter(self._contexts.values()), [])
        table = _merge_tables(tables, snapshot.step, contexts)
        too_long = any(len(p) > self.full_attention_limit for p in snapshot.probes)
        whole = [p for p in snapshot.probes if not p.pooled]
        if table is None and (scores or too_long) and whole:  # the output_attentions path
            table = score(whole, patterns, step=snapshot.step)
        probes = []
        keep_qk = {self.encoded[i].name for i in self.storage.qk}
        for p in snapshot.probes:
            if p.name not in keep_qk and p.queries is not None:  # over archive_mb
                p = ProbeAttention(**{**vars(p), "queries": None, "keys": None, "scaling": None})
            if not p.pooled and len(p) > self.full_attention_limit:
                pooled, spans = pool_attention(p.attention, self.pooled_size)
                p = ProbeAttention(**{**vars(p), "attention": pooled, "spans": spans,
                                      "queries": None, "keys": None})  # fmt: skip
            if p.pooled and p.labels is None:
                p.labels = span_labels(p.tokens, p.spans)
            probes.append(p)
        snapshot.probes = probes
        return snapshot, table

    def _run_stream(self, model, chunk, current: Pass, patterns, scores: bool, sharded: bool):
        """One batch forward through attnlog's attention → (probes, ScoreTable or None).

        None when the model's attention never called attnlog's function (then the caller takes
        the output_attentions path). Sharded: all ranks agree before the forward (a rank that
        could not prepare must not leave the others waiting in its all-gathers) and after it.
        """
        device = model_device(model)
        error = stream = call = accumulator = None
        try:
            # One long probe anywhere: the event's table comes from the pass, for every batch.
            long = any(len(p) > self.full_attention_limit for p in self.encoded)
            if scores or long:
                accumulator = self._accumulator(model, chunk, patterns, device)
            stream = Stream(
                [len(p) for p in chunk],
                accumulator,
                full_limit=self.full_attention_limit,
                pooled_size=self.pooled_size,
                chunked_above=self.chunked_above,
                records_qk=self.record_qk and current.records_qk,
                wants_logits=patterns is None or "max_logit" in patterns,
            )
            call = batches.model_inputs(model, self.tokenizer, chunk, sharded)
        except Exception as ex:
            error = ex
        settle(error, sharded, device)
        current.stream = stream
        try:
            batches.forward(*call)
        finally:
            current.stream = None
        settle(stream.error, sharded, device)
        if stream.layers == 0:
            return None
        probes = [
            batches.probe_attention(p, self.causal, **stream.probe_arrays(b))
            for b, p in enumerate(chunk)
        ]
        return probes, None if accumulator is None else accumulator.table(0)

    def _accumulator(self, model, chunk, patterns, device) -> Any:
        from attnlog.patterns import ScoreAccumulator

        text = text_config(model.config)
        key = str(device)
        if key not in self._contexts:
            self._contexts = {key: [_context(p, self.causal, device) for p in self.encoded]}
        index = {id(p): i for i, p in enumerate(self.encoded)}
        contexts = [self._contexts[key][index[id(p)]] for p in chunk]
        return ScoreAccumulator(
            contexts,
            patterns,
            int(text.num_hidden_layers),
            int(text.num_attention_heads),
            device,
            names=[p.name for p in chunk],
        )


def capture(
    model: Any, tokenizer: Any, probes: Any = None, *, step: int = 0, **options: Any
) -> Snapshot:
    """Attention of `probes` in `model`, once: `capture(model, tokenizer, ["The cat sat."])`.

    Score it with `attnlog.score(snapshot)`. Only the given probes are captured (pass
    `induction_probe=True` to add the built-in one); `step=` labels the snapshot; the other
    keywords are `CaptureOptions`. For repeated captures build a `Capturer` once and call it.
    """
    options.setdefault("induction_probe", False)
    return Capturer(model, tokenizer, probes, CaptureOptions.create(options, "capture"))(step)


def _weights(model: Any) -> tuple:
    """Which tensors the model holds and their versions: torch counts every in-place change
    (an optimizer step, `load_state_dict`), and `.to()` shows in dtype and device."""
    inner = unwrap_model(model)
    try:
        return tuple(
            (id(t), t._version, t.dtype, t.device)
            for t in itertools.chain(inner.parameters(), inner.buffers())
        )
    except RuntimeError:  # inference-mode tensors keep no version: never taken as unchanged
        return (object(),)


def _batches(
    encoded: list[EncodedProbe], size: int | None, alone_above: int
) -> list[list[EncodedProbe]]:
    """Probes in order, `size` to a batch (all by default); a probe over `alone_above` tokens
    in a batch of its own, so that no shorter probe pads it and adds an n x n mask."""
    batches: list[list[EncodedProbe]] = []
    group: list[EncodedProbe] = []
    for p in encoded:
        if len(p) > alone_above:
            batches += [group, [p]] if group else [[p]]
            group = []
            continue
        group.append(p)
        if size is not None and len(group) == size:
            batches.append(group)
            group = []
    return batches + [group] if group else batches


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


def _with_induction_probe(probe_set: ProbeSet, tokenizer: Any) -> ProbeSet:
    """The probe set plus the built-in induction probe, unless a probe has its name or the
    vocabulary is too small for one."""
    if any(p.name == "induction" for p in probe_set):
        return probe_set
    probe = builtin_induction_probe(tokenizer)
    return probe_set if probe is None else ProbeSet([*probe_set, probe])
