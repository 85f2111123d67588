"""`import attnlog` stays light; the heavy names load on first use."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "mlflow", "tensorboard", "IPython", "matplotlib")


def run(code: str) -> str:
    """Run `code` in a fresh interpreter (this one has imported everything already)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_attnlog_loads_no_heavy_package():
    loaded = run(
        "import sys, attnlog\n"
        "attnlog.Probe, attnlog.ProbeSet\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert loaded == "[]"


def test_the_callback_is_importable_from_the_package():
    name = run(
        "from attnlog import AttentionLoggerCallback\n"
        "import transformers\n"
        "assert issubclass(AttentionLoggerCallback, transformers.TrainerCallback)\n"
        "print(AttentionLoggerCallback.__module__)"
    )
    assert name == "attnlog.callbacks.trainer"


def test_the_writer_module_is_light_too():
    """The writer process imports a sink's backend only when it builds that sink."""
    loaded = run(
        "import sys, attnlog.writer\n"
        f"print(sorted(m for m in {(*HEAVY, 'torch')!r} if m in sys.modules))"
    )
    assert loaded == "[]"
