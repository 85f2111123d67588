"""What the probe pass needs to know about a model: the Hugging Face model inside its wrappers,
whether it is sharded or causal, the module to call and what its forward accepts."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["AttentionUnavailableError", "is_sharded", "unwrap_model"]

# Encoder-only model types: every token attends both ways (no causal mask).
_ENCODERS = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta",
                       "deberta", "deberta-v2", "camembert", "mpnet", "xlm", "ernie",
                       "modernbert", "esm"})  # fmt: skip


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


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def text_config(config: Any) -> Any:
    """The language part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_causal(config: Any) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False  # the encoder, which is what the scores read, sees both directions
    if getattr(config, "is_decoder", False):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in architectures):
        return True
    return getattr(config, "model_type", "") not in _ENCODERS


def body(model: Any) -> Any:
    """The transformer without its task head: no logits over a large vocabulary for probes."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def accepts(module: Any, name: str) -> bool:
    return _forward_accepts(type(module), name)


@functools.cache
def _forward_accepts(cls: type, name: str) -> bool:
    """Whether `cls.forward` takes `name`; looked up once per class, not at every probe pass."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def nonempty(attentions: Any, model_name: str) -> Any:
    if not attentions or any(a is None for a in attentions):
        raise AttentionUnavailableError(
            f"{model_name} returned no attention weights even with eager attention. attnlog needs "
            "a model whose forward accepts output_attentions=True (most transformers models do; "
            "check that your transformers version supports output_attentions for this model)"
        )
    return attentions
