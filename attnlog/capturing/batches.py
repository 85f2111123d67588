"""Probe batches as model inputs, and the `output_attentions` path.

Encoder-decoder models (BART, T5), models whose attention does not go through transformers'
`AttentionInterface`, and transformers before 4.48 cannot stream: the model returns every
layer's attention (`output_attentions`) and it is reduced afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnlog.capturing.attention import Pass
from attnlog.capturing.models import accepts, body, model_device, nonempty
from attnlog.probes import EncodedProbe
from attnlog.snapshot import ProbeAttention

__all__ = ["forward", "model_inputs", "probe_attention", "run_batch", "run_seq2seq"]


def batch_inputs(tokenizer: Any, chunk: Sequence[EncodedProbe], device) -> dict[str, Any]:
    """Right-padded batch: valid tokens keep positions 0..n-1, as in an unpadded pass."""
    width = max(len(p) for p in chunk)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
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


def model_inputs(model, tokenizer, chunk: Sequence[EncodedProbe], sharded: bool):
    """(module to call, its inputs). Sharded models run from their root, whose forward gathers
    the root's own parameters; others from the body, so no logits over a large vocabulary are
    computed."""
    module = model if sharded else body(model)
    inputs = batch_inputs(tokenizer, chunk, model_device(model))
    if "token_type_ids" in inputs and not accepts(module, "token_type_ids"):
        del inputs["token_type_ids"]
    if accepts(module, "use_cache"):
        inputs["use_cache"] = False
    return module, inputs


def forward(module, inputs, **options):
    return module(**inputs, return_dict=True, **options)


def probe_attention(p: EncodedProbe, causal: bool, **arrays) -> ProbeAttention:
    """A probe's captured attention with its token masks.

    The masks stay small CPU tensors: scoring derives its masks on the CPU anyway, and a host
    copy of them would cost a GPU one synchronisation each.
    """

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
        causal=causal,
        is_pair=p.is_pair,
        **arrays,
    )


def run_batch(model, tokenizer, chunk, current: Pass, sharded: bool, *, causal: bool, qk: bool):
    """Every layer's whole attention from `output_attentions`, split per probe."""
    outputs = forward(*model_inputs(model, tokenizer, chunk, sharded), output_attentions=True)
    attentions = nonempty(getattr(outputs, "attentions", None), type(model).__name__)
    queries, keys, scaling = stack_qk(current, len(attentions), qk)
    result = []
    for row, p in enumerate(chunk):
        n = len(p)
        result.append(
            probe_attention(
                p,
                causal,
                attention=torch.stack([a[row, :, :n, :n] for a in attentions]),
                queries=None if queries is None else queries[:, row, :, :n],
                keys=None if keys is None else keys[:, row, :, :n],
                scaling=scaling,
            )
        )
    return result


def run_seq2seq(model, tokenizer, p: EncodedProbe, current: Pass, qk: bool) -> ProbeAttention:
    """Encoder–decoder: the decoder reads the probe shifted right (teacher forcing)."""
    device = model_device(model)
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "bos_token_id", None) or 0
    ids = torch.from_numpy(p.input_ids).unsqueeze(0).to(device)
    decoder_ids = torch.cat([torch.tensor([[start]], device=device), ids[:, :-1]], dim=1)
    outputs = body(model)(input_ids=ids, attention_mask=torch.ones_like(ids),
                          decoder_input_ids=decoder_ids, output_attentions=True,
                          return_dict=True, use_cache=False)  # fmt: skip
    name = type(model).__name__
    encoder = nonempty(outputs.encoder_attentions, name)
    decoder = nonempty(outputs.decoder_attentions, name)
    cross = nonempty(outputs.cross_attentions, name)
    encoder_modules = set(map(id, model.get_encoder().modules())) if current.records_qk else set()
    queries, keys, scaling = stack_qk(
        current, len(encoder), qk, keep=lambda m: id(m) in encoder_modules
    )
    return probe_attention(
        p,
        False,
        attention=torch.stack([a[0] for a in encoder]),
        queries=None if queries is None else queries[:, 0],
        keys=None if keys is None else keys[:, 0],
        scaling=scaling,
        decoder_tokens=tokenizer.convert_ids_to_tokens(decoder_ids[0].tolist()),
        decoder_attention=torch.stack([a[0] for a in decoder]),
        cross_attention=torch.stack([a[0] for a in cross]),
    )


def stack_qk(current: Pass, num_layers: int, qk: bool, keep: Callable | None = None):
    """Recorded calls → queries, keys `[L, B, H, n, d]` (keys expanded per query head)."""
    calls = [c for c in current.calls if keep is None or keep(c[0])]
    current.calls.clear()
    if not (qk and current.records_qk) or len(calls) != num_layers:
        return None, None, None
    queries, keys = [], []
    for _, q, k, _ in calls:
        if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head per group
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        queries.append(q)
        keys.append(k)
    return torch.stack(queries), torch.stack(keys), calls[0][3]
