"""attnlog installs from its wheel, not only from a clone.

The sdist and the wheel are built offline from a copy of the checkout (`python -m build
--no-isolation`; the wheel is built from the sdist, so the sdist is complete too), the wheel is
installed into a fresh venv (torch and the other dependencies come from this machine's
site-packages), and a folder outside the checkout checks what a user of the wheel relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*_cache", "runs", "mlruns"
)


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> str:
    """Run a command without this checkout on its path; its failure shows its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The folder holding the sdist and the wheel. Built from a copy: a build writes
    `build/` and `attnlog.egg-info/` next to the sources it reads."""
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", source, cwd=tmp)
    return tmp / "dist"


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed, nothing else: its dependencies are this
    machine's (`--system-site-packages`), so no index is needed."""
    folder = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder, cwd=dist)
    wheel = next(dist.glob("attnlog-*.whl"))
    python = folder / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index")
    run(*pip, "--quiet", wheel, cwd=dist)
    return folder


def test_the_build_makes_an_sdist_and_a_wheel_of_this_version(dist):
    import attnlog

    names = sorted(p.name for p in dist.iterdir())
    version = attnlog.__version__
    assert names == [f"attnlog-{version}-py3-none-any.whl", f"attnlog-{version}.tar.gz"]


def test_the_wheel_holds_every_module_and_data_file_of_the_checkout(dist):
    """New subpackages, the vendored JavaScript (HTML views, the Attention tab), their licences
    and any font: a file missing here works from a clone and breaks for every wheel user."""
    wheel = zipfile.ZipFile(next(dist.glob("*.whl")))
    expected = installed_names(ROOT / "attnlog", "attnlog")
    expected |= installed_names(ROOT / "callbacks", "attnlog/callbacks")
    assert sorted(expected - set(wheel.namelist())) == []
    vendored = {"attnlog/render/static/head_view.js", "attnlog/tensorboard_plugin/static/index.js"}
    assert vendored <= expected


def installed_names(folder: Path, prefix: str) -> set[str]:
    """Where the files of a checkout folder land in the wheel."""
    found = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return {f"{prefix}/{p.relative_to(folder).as_posix()}" for p in found}


WHAT_A_USER_IMPORTS = """
import importlib.metadata, importlib.resources, importlib.util, json
import attnlog, attnlog.callbacks
from tensorboard.plugins.base_plugin import TBPlugin

(plugin,) = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins")
             if e.name == "attnlog"]
loaded = plugin.load()
static = importlib.resources.files("attnlog.tensorboard_plugin") / "static"
views = importlib.resources.files("attnlog.render") / "static"
print(json.dumps({
    "attnlog": attnlog.__file__,
    "callbacks": attnlog.callbacks.__file__,
    "trainer": importlib.util.find_spec("attnlog.callbacks.trainer").origin,
    "plugin": [loaded.__name__, issubclass(loaded, TBPlugin), str(plugin.dist.locate_file(""))],
    "static": sorted(p.name for p in static.iterdir()),
    "views": sorted(p.name for p in views.iterdir() if p.name.endswith(".js")),
}))
"""


@pytest.mark.slow
def test_the_installed_wheel_works_outside_the_checkout(venv, tmp_path):
    site = str(venv / "lib")
    found = json.loads(run(venv / "bin" / "python", "-c", WHAT_A_USER_IMPORTS, cwd=tmp_path))
    assert found["attnlog"].startswith(site), "attnlog came from somewhere else than the wheel"
    assert found["callbacks"].startswith(site) and found["trainer"].startswith(site)
    assert found["plugin"][:2] == ["AttentionPlugin", True]
    assert found["plugin"][2].startswith(site), "the entry point is not the wheel's"
    assert {"index.js", "style.css"} <= set(found["static"])
    assert {"d3.min.js", "head_view.js", "model_view.js", "neuron_view.js"} <= set(found["views"])


@pytest.mark.slow
def test_the_console_script_runs(venv, tmp_path):
    import attnlog

    script = venv / "bin" / "attnlog"
    assert "demo" in run(script, "--help", cwd=tmp_path)
    assert run(script, "--version", cwd=tmp_path).strip() == f"attnlog {attnlog.__version__}"


def test_a_plain_checkout_finds_attnlog_callbacks():
    """With only the checkout on the path (no site-packages, so no editable install's finder),
    `attnlog.callbacks` is the top-level callbacks/ folder."""
    code = (
        "import importlib.util, attnlog\n"
        "print(attnlog.__file__)\n"
        "print(importlib.util.find_spec('attnlog.callbacks').origin)\n"
        "import attnlog.callbacks"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd=Path("/"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    package, callbacks = done.stdout.split()
    assert package == str(ROOT / "attnlog" / "__init__.py")
    assert callbacks == str(ROOT / "callbacks" / "__init__.py")
