"""examples/induction_heads.py: the logged `induction` score shows the phase change, offline,
within CI's budget (about 15 s of CPU for 300 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "induction_heads.py"


@pytest.mark.slow
def test_induction_score_jumps_during_training(tmp_path):
    pytest.importorskip("tokenizers")
    logdir = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["--steps", "300", "--every", "50", "--logdir", str(logdir)]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from induction_heads import induction_by_step
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    scores = induction_by_step(str(logdir))  # read back from the archive
    assert sorted(scores) == [0, 50, 100, 150, 200, 250, 300]
    assert scores[0] < 0.2  # no induction head in the random initialisation
    assert scores[300] > 0.5  # formed: the best head puts most of its mass on the copy's successor
    assert max(scores[s] for s in (0, 50, 100)) < scores[300] - 0.3  # a rise, not noise
    assert list(logdir.glob("events.out.tfevents.*"))  # TensorBoard shows it
    assert f"Attention logged to {logdir}" in result.stdout
