"""attnlog: watch transformer attention change while the model trains.

One-shot capture is `attnlog.capture.capture(model, tokenizer, probes)` (the submodule owns the
name `attnlog.capture`). `attnlog.load(logdir_or_npz)` reads an archived step back as a
`Snapshot` with its `.scores`. `import attnlog` stays light: transformers, mlflow and
tensorboard are imported only when the names that need them are first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AttentionLogger",
    "AttentionLoggerCallback",
    "Probe",
    "ProbeSet",
    "Sink",
    "Snapshot",
    "load",
    "register_pattern",
    "register_sink",
    "score",
]

_LAZY = {
    "AttentionLogger": "attnlog.logger",
    "AttentionLoggerCallback": "attnlog.callbacks.trainer",
    "Probe": "attnlog.probes",
    "ProbeSet": "attnlog.probes",
    "Snapshot": "attnlog.snapshot",
    "load": "attnlog.report",
    "register_pattern": "attnlog.patterns",
    "score": "attnlog.patterns",
    "register_sink": "attnlog.sinks.base",
    "Sink": "attnlog.sinks.base",
}

if TYPE_CHECKING:
    from attnlog.callbacks.trainer import AttentionLoggerCallback
    from attnlog.logger import AttentionLogger
    from attnlog.patterns import register_pattern, score
    from attnlog.probes import Probe, ProbeSet
    from attnlog.report import load
    from attnlog.sinks.base import Sink, register_sink
    from attnlog.snapshot import Snapshot


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'attnlog' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
