"""attnlog: watch transformer attention change while the model trains.

One-shot capture is `attnlog.capture(model, tokenizer, probes)` and `attnlog.score(snapshot)`
scores it. `attnlog.load(logdir_or_npz)` reads an archived step back as a
`Snapshot` with its `.scores`. `import attnlog` stays light: transformers, mlflow and
tensorboard are imported only when the names that need them are first used.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = [
    "AttentionLogger",
    "AttentionLoggerCallback",
    "Probe",
    "ProbeSet",
    "Sink",
    "Snapshot",
    "capture",
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
    "capture": "attnlog.capturing",
    "load": "attnlog.report",
    "register_pattern": "attnlog.patterns",
    "score": "attnlog.patterns",
    "register_sink": "attnlog.sinks.base",
    "Sink": "attnlog.sinks.base",
}

if TYPE_CHECKING:
    from attnlog.callbacks.trainer import AttentionLoggerCallback
    from attnlog.capturing import capture
    from attnlog.logger import AttentionLogger
    from attnlog.patterns import register_pattern, score
    from attnlog.probes import Probe, ProbeSet
    from attnlog.report import load
    from attnlog.sinks.base import Sink, register_sink
    from attnlog.snapshot import Snapshot


class _CheckoutCallbacks(importlib.abc.MetaPathFinder):
    """Finds `attnlog.callbacks` in the top-level `callbacks/` folder of a source checkout.

    A wheel maps that folder into the package (`package-dir` in pyproject.toml); a plain checkout
    on `sys.path` has no such mapping, so without this finder `import attnlog.callbacks` would fail
    there, or pick up another checkout's folder through an editable install.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "attnlog.callbacks":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def _find_callbacks_in_checkout() -> None:
    here = Path(__file__).resolve().parent
    folder = here.parent / "callbacks"
    if (here / "callbacks").is_dir() or not (folder / "__init__.py").is_file():
        return  # an installed wheel, or a layout without the top-level folder
    if not (here.parent / "pyproject.toml").is_file():
        return
    sys.meta_path.insert(0, _CheckoutCallbacks(folder))


_find_callbacks_in_checkout()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'attnlog' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
