"""Run the probes through the live model and take exact attention weights, queries and keys.

Models usually train with `sdpa` or flash attention, which return no weights. For the probe pass
the model is switched to attnlog's own attention function, which calls the model's *eager*
attention (so the weights are exactly what eager gives) and records the query and key vectors it
receives: these are after rotary embeddings, and grouped-query keys are expanded per head here.
Everything the pass changes (attention implementation, train/eval mode of every module, RNG
state) is restored in `finally`, so training is bit-identical with or without attnlog.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from attnlog.probes import EncodedProbe, ProbeSet, model_max_length
from attnlog.snapshot import ProbeAttention, Snapshot

_IMPL_NAME = "attnlog_eager"


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
    """FSDP (1 or 2) and DeepSpeed ZeRO-3 shard parameters across ranks: one rank cannot run
    the model alone."""
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


class _Recorder:
    """Collects (module, query, key, scaling) from each attention call of one forward pass."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, torch.Tensor, torch.Tensor, float | None]] = []
        self.enabled = False


_RECORDER = _Recorder()


def _attention_function(module, query, key, value, attention_mask, *args, **kwargs):
    """Registered with transformers' AttentionInterface: the model's eager attention + a record."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise AttentionUnavailableError(
            f"{type(module).__name__} has no eager attention function to take weights from"
        )
    if _RECORDER.enabled:
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        _RECORDER.calls.append((module, query.detach(), key.detach(), float(scaling)))
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


def _register_attention_function() -> bool:
    """Register attnlog's attention function; False on transformers without AttentionInterface."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    if _IMPL_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_IMPL_NAME, _attention_function)
    try:  # transformers >= 4.53 builds masks per implementation: ours takes eager's mask
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return True
    if _IMPL_NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(_IMPL_NAME, eager_mask)
    return True


@contextlib.contextmanager
def probe_pass(model: torch.nn.Module) -> Iterator[bool]:
    """Eval mode, no grad, eager-exact attention; everything restored afterwards.

    Yields whether query/key vectors are recorded (needs transformers' AttentionInterface).
    """
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    records_qk = _register_attention_function() and hasattr(model, "set_attn_implementation")
    switched = False
    try:
        if records_qk:
            model.set_attn_implementation(_IMPL_NAME)
            switched = True
        elif previous not in (None, "eager"):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
            else:
                config._attn_implementation = "eager"
            switched = True
        model.eval()
        _RECORDER.calls.clear()
        _RECORDER.enabled = records_qk
        with torch.no_grad():
            yield records_qk
    finally:
        _RECORDER.enabled = False
        _RECORDER.calls.clear()
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


class Capturer:
    """Prepared once per logger: probes tokenised, model checked; `__call__(step)` captures.

    Args:
        model: a Hugging Face model (wrappers are unwrapped at every call, so the live
            trained weights are used).
        tokenizer: the model's tokenizer.
        probes: probe values, a ProbeSet, a file path or None for the defaults.
        max_length: longest probe in tokens (default: what the model accepts).
        on_long: "truncate" (warn) or "error" for over-long probes.
        batch_size: probes per forward pass (None: all in one padded batch).
        record_qk: keep query/key vectors (for the neuron view and `max_logit`).
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
    ) -> None:
        if tokenizer is None:
            raise ValueError("attnlog needs the model's tokenizer to encode the probes")
        if is_sharded(model):
            raise ValueError(
                "attnlog does not capture from FSDP/ZeRO-3 sharded models yet: every rank would "
                "have to join the probe forward. Log from an unsharded copy, or use DDP"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.probe_set = ProbeSet.coerce(probes)
        inner = unwrap_model(model)
        config = getattr(inner, "config", None)
        if config is None:
            raise TypeError(
                f"{type(inner).__name__} is not a Hugging Face model (no .config); attnlog "
                "captures attention from transformers models"
            )
        limit = model_max_length(tokenizer, config)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} is more than the model accepts ({limit})")
        self.encoded = self.probe_set.encode(
            tokenizer, max_length=max_length or limit, on_long=on_long
        )
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.causal = _is_causal(config)
        self.batch_size = batch_size or len(self.encoded)
        self.record_qk = record_qk
        self._check_vocabulary(inner)

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
        model = unwrap_model(self.model)
        probes: list[ProbeAttention] = []
        with probe_pass(model) as records_qk:
            for start in range(0, len(self.encoded), self.batch_size):
                chunk = self.encoded[start : start + self.batch_size]
                if self.is_encoder_decoder:
                    probes.extend(self._run_seq2seq(model, p, records_qk) for p in chunk)
                else:
                    probes.extend(self._run_batch(model, chunk, records_qk))
        config = model.config
        return Snapshot(
            step=step,
            probes=probes,
            model_type=str(getattr(config, "model_type", "")),
            meta={"causal": self.causal, "encoder_decoder": self.is_encoder_decoder},
        )

    def measure(
        self, step: int, patterns: Sequence[str] | None = None, *, scores: bool = True
    ) -> tuple[Snapshot, Any]:
        """One probe pass → (host Snapshot, ScoreTable or None): what the logger hands off.

        This is the training process's whole share of a logging event: the forward, the scores
        on the device, one device→host copy. With `scores=False` the table is None and the
        writer scores the host snapshot (cheaper for the training process on a CPU).
        """
        from attnlog import patterns as pattern_registry

        snapshot = self(step)
        table = pattern_registry.score(snapshot, patterns, step=step) if scores else None
        return snapshot.to_host(), table

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

    def _run_batch(self, model, chunk: Sequence[EncodedProbe], records_qk: bool):
        body = _body(model)
        inputs = self._batch_inputs(chunk, _model_device(model))
        if "token_type_ids" in inputs and not _accepts(body, "token_type_ids"):
            del inputs["token_type_ids"]
        kwargs = {"use_cache": False} if _accepts(body, "use_cache") else {}
        outputs = body(**inputs, output_attentions=True, return_dict=True, **kwargs)
        attentions = _nonempty(getattr(outputs, "attentions", None), type(model).__name__)
        queries, keys, scaling = self._stack_qk(records_qk, len(attentions))
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

    def _run_seq2seq(self, model, p: EncodedProbe, records_qk: bool) -> ProbeAttention:
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
        encoder_modules = set(map(id, model.get_encoder().modules())) if records_qk else set()
        queries, keys, scaling = self._stack_qk(
            records_qk, len(encoder), keep=lambda m: id(m) in encoder_modules
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

    def _stack_qk(self, records_qk: bool, num_layers: int, keep=None):
        """Recorded calls → queries, keys `[L, B, H, n, d]` (keys expanded per query head)."""
        calls = [c for c in _RECORDER.calls if keep is None or keep(c[0])]
        _RECORDER.calls.clear()
        if not (self.record_qk and records_qk) or len(calls) != num_layers:
            return None, None, None
        queries, keys = [], []
        for _, q, k, _ in calls:
            if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head per group
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            queries.append(q)
            keys.append(k)
        return torch.stack(queries), torch.stack(keys), calls[0][3]

    def _probe(self, p: EncodedProbe, **arrays) -> ProbeAttention:
        device = arrays["attention"].device

        def tensor(values):
            return None if values is None else torch.from_numpy(values).to(device)

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

    For repeated captures (a logger), build a `Capturer` once and call it.
    """
    return Capturer(model, tokenizer, probes, **options)(step)


# -- helpers ---------------------------------------------------------------------------------


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
