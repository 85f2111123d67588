"""The capture options, checked in one place.

`AttentionLogger`, the callbacks, `Capturer` and `capture()` all take these keywords. They are
checked here, when the object is built, so a wrong value fails on the line that passed it (for a
callback: when it is built, before any model is loaded), with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CaptureOptions"]

#: Probes up to this many tokens keep their whole attention (and q/k); longer ones are pooled.
FULL_ATTENTION_LIMIT = 256
#: MiB the stored attention of one event may take (float16, before compression).
ARCHIVE_MB = 16
#: Batches wider than this many tokens are reduced from q/k in chunks of query rows.
CHUNKED_ABOVE = 1024
ON_LONG = ("truncate", "error")
_WHOLE_NUMBERS = ("max_length", "batch_size", "full_attention_limit", "pooled_size",
                  "chunked_above")  # fmt: skip


@dataclass(frozen=True)
class CaptureOptions:
    """How a probe pass runs and what it keeps.

    Attributes:
        max_length: longest probe in tokens (default: what the model accepts).
        on_long: "truncate" (warn) or "error" for over-long probes.
        batch_size: probes per forward pass (None: all in one padded batch).
        record_qk: keep query/key vectors (for the neuron view) of probes with whole attention.
        full_attention_limit: probes up to this many tokens keep their whole attention; longer
            ones keep it pooled by blocks (the scores stay exact).
        pooled_size: most blocks per axis of a pooled attention map.
        archive_mb: what the stored attention of one event may take, in MiB (float16, before
            compression): whole maps, q/k and pooled maps together.
        chunked_above: batches wider than this many tokens are reduced in chunks of query rows
            from q/k, with `sdpa` computing the model's output (no n x n in memory).
        induction_probe: add the built-in induction probe for causal models.
    """

    max_length: int | None = None
    on_long: str = "truncate"
    batch_size: int | None = None
    record_qk: bool = True
    full_attention_limit: int = FULL_ATTENTION_LIMIT
    pooled_size: int = 256
    archive_mb: float = ARCHIVE_MB
    chunked_above: int = CHUNKED_ABOVE
    induction_probe: bool = True

    def __post_init__(self) -> None:
        for name in _WHOLE_NUMBERS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be a whole number, got {value!r}")
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be at least 1, got {value} (or leave it out)")
        for name in ("full_attention_limit", "pooled_size", "chunked_above"):
            if getattr(self, name) is None:
                raise TypeError(f"{name} must be a whole number, got None (or leave it out)")
        if self.on_long not in ON_LONG:
            raise ValueError(f"on_long must be 'truncate' or 'error', got {self.on_long!r}")
        for name in ("record_qk", "induction_probe"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        mb = self.archive_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb):
            raise TypeError(f"archive_mb must be a number of MiB, got {mb!r}")
        if not mb > 0:
            raise ValueError(f"archive_mb must be more than 0, got {mb!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, options: Mapping[str, Any], who: str = "attnlog") -> CaptureOptions:
        """The options from keywords, or a TypeError naming the closest known option."""
        names = cls.names()
        for name in options:
            if name not in names:
                raise TypeError(unknown_option(who, name, names))
        return cls(**options)


def unknown_option(who: str, name: str, accepted: Any) -> str:
    """The message for an unknown keyword, with the closest accepted name."""
    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{who} got an unknown option {name!r}; {hint}options: {', '.join(sorted(accepted))}"
