"""The training process, scoring and the TensorBoard plugin never import the renderers or PIL.

Rendering (heatmaps, HTML views, fonts) belongs to the writer; a training process that imported
it would pay PIL's import and memory for nothing, and a plugin that imported it would load PIL
into TensorBoard. Each check runs in a fresh interpreter so that nothing imported by another
test hides what a module pulls in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).parents[1])  # this checkout's attnlog, not an installed one

CHECK = """
import json, sys
{code}
rendering = sorted(
    m for m in sys.modules if m == "PIL" or m.startswith(("PIL.", "attnlog.render"))
)
print(json.dumps(rendering))
"""


def _rendering_modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(code=code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    ["attnlog.logger", "attnlog.patterns", "attnlog.words", "attnlog.tensorboard_plugin.plugin"],
)
def test_module_imports_no_rendering(module):
    assert _rendering_modules_after(f"import {module}") == []


def test_checking_the_logger_options_imports_no_rendering():
    """The callbacks check `views` when they are built: the names come from `attnlog.layout`."""
    code = (
        "from attnlog.logger import check_options\n"
        "check_options({'views': ['head', 'model_words'], 'patterns': ['sink']})"
    )
    assert _rendering_modules_after(code) == []


def test_the_renderer_and_the_logger_accept_the_same_views():
    from attnlog.layout import DEFAULT_VIEWS, VIEWS
    from attnlog.logger import check_options
    from attnlog.render import event

    assert event.VIEWS == VIEWS and event.DEFAULT_VIEWS == DEFAULT_VIEWS
    check_options({"views": VIEWS})
    with pytest.raises(ValueError, match="unknown views"):
        check_options({"views": ["heads"]})
