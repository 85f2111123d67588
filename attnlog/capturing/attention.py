"""attnlog's attention function and the state of one probe pass.

Models usually train with `sdpa` or flash attention, which return no weights. For the probe pass
the model is switched to attnlog's own attention function, registered with transformers'
`AttentionInterface`. It runs the model's *eager* attention and hands each layer to the pass's
`Stream`, which reduces it at once. Everything a pass changes (attention implementation,
train/eval mode of every module, RNG state) is restored in `finally`, so training is
bit-identical with or without attnlog.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from attnlog.capturing.models import AttentionUnavailableError

if TYPE_CHECKING:
    from attnlog.capturing.stream import Stream

__all__ = ["Pass", "probe_pass"]

IMPL_NAME = "attnlog_eager"

# One probe pass at a time in the whole process. A pass switches the model's attention
# implementation and its train/eval modes, and saves and restores the process-wide RNG state:
# none of that nests across threads. The lock is global rather than per model because the RNG
# state is global; passes are short and rare, so two loggers seldom wait on each other.
_PASS_LOCK = threading.RLock()
# The pass the attention function reports to. A context variable, not a module attribute: a
# forward that runs outside the pass (another thread) sees None and records nothing.
_CURRENT: contextvars.ContextVar[Pass | None] = contextvars.ContextVar("attnlog_pass", default=None)


class Pass:
    """What one probe pass records. Found by the attention function through `_CURRENT`.

    `calls` gets (module, query, key, scaling) per attention call on the `output_attentions`
    path; `stream` reduces layers as they are computed on the streaming path.
    """

    def __init__(self, ours: bool, record_qk: bool) -> None:
        self.ours = ours  # attnlog's attention function is the model's for this pass
        self.records_qk = ours and record_qk
        self.calls: list[tuple[Any, torch.Tensor, torch.Tensor, float]] = []
        self.stream: Stream | None = None


def scaling_of(module: Any, query: torch.Tensor, kwargs: dict[str, Any]) -> float:
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    return float(query.shape[-1] ** -0.5 if scaling is None else scaling)


def eager_of(module: Any) -> Any:
    """The eager attention function of the module's own modelling file."""
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
        scaling = scaling_of(module, query, kwargs)
        current.calls.append((module, query.detach(), key.detach(), scaling))
    return eager_of(module)(module, query, key, value, attention_mask, *args, **kwargs)


def _mask_function(*args, **kwargs):
    """Masks for attnlog's attention: eager's, or sdpa's (None or bool, no float n x n) when the
    stream reduces rows from q/k."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    current = _CURRENT.get()
    chunked = current is not None and current.stream is not None and current.stream.chunked
    return (sdpa_mask if chunked else eager_mask)(*args, **kwargs)


@functools.cache
def register_attention_function() -> bool:
    """Register attnlog's attention function; False on transformers without AttentionInterface.

    `register` is public and only updates a mapping, so registering again is harmless; cached
    so it runs once per process.
    """
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(IMPL_NAME, _attention_function)
    try:  # transformers >= 4.53 builds masks per implementation
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return True
    AttentionMaskInterface.register(IMPL_NAME, _mask_function)
    return True


@contextlib.contextmanager
def probe_pass(model: torch.nn.Module, *, record_qk: bool = True) -> Iterator[Pass]:
    """Eval mode, no grad, attnlog's attention; everything restored afterwards. One at a time.

    Yields the pass; its `ours` says whether attnlog's attention function is in use (it needs
    transformers' AttentionInterface and `set_attn_implementation`).
    """
    with _PASS_LOCK:
        modes = [(m, m.training) for m in model.modules()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        ours = register_attention_function() and hasattr(model, "set_attn_implementation")
        current = Pass(ours, record_qk)
        token = _CURRENT.set(current)
        restore = None
        try:
            restore = _switch_attention(model, ours)
            model.eval()
            with torch.no_grad():
                yield current
        finally:
            _CURRENT.reset(token)
            if restore is not None:
                restore()
            for module, training in modes:
                module.training = training
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _switch_attention(model: Any, ours: bool) -> Any:
    """Switch to attnlog's attention (or eager); returns what switches back, or None."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    settable = hasattr(model, "set_attn_implementation")
    if ours:
        model.set_attn_implementation(IMPL_NAME)
    elif previous not in (None, "eager"):
        if settable:
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
    else:
        return None

    def restore() -> None:
        if settable and previous is not None:
            model.set_attn_implementation(previous)
        else:
            config._attn_implementation = previous

    return restore
