"""`attnlog compare`: two MLflow runs of a real sqlite store (and two logdirs) give one
self-contained page that draws in Chromium and is logged to both runs."""

from __future__ import annotations

import numpy as np
import pytest
from browser import browser, wait_for  # noqa: F401  (session fixture)

from attnlog.cli import main
from attnlog.report import UNBOUNDED

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


def tiny_scores(tokenizer, seed):
    """Real pattern scores of a tiny random BERT (2 layers x 4 heads) on two probes."""
    import torch
    from transformers import BertConfig, BertModel

    from attnlog.capturing import capture
    from attnlog.patterns import score

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    probes = ["The cat sat on the mat.", ("The dog ran.", "It was fast.")]
    return score(capture(BertModel(config).eval(), tokenizer, probes))


@pytest.fixture(scope="module")
def two_runs(minilm, tmp_path_factory):
    """(tracking uri, run id A, run id B, tables) logged by the real MLflow sink."""
    from attnlog.sinks.mlflow import MLflowSink

    _, tokenizer = minilm
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("cmp", artifact_location=str(root / "art"))
    ids, tables = [], []
    for seed in (0, 1):
        table = tiny_scores(tokenizer, seed)
        sink = MLflowSink(uri, experiment_name="cmp", spool_dir=root / f"spool{seed}")
        sink.log_scores(table, 10)
        sink.close()
        ids.append(sink.run_id)
        tables.append(table)
    return uri, ids[0], ids[1], tables


def test_compare_two_mlflow_runs_writes_and_logs_one_page(two_runs, tmp_path, capsys, browser):  # noqa: F811
    uri, a, b, tables = two_runs
    out = tmp_path / "cmp.html"
    assert main(["compare", f"runs:/{a}", b, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("A: ") and a[:8] in lines[0] and b[:8] in lines[1]
    # The first row is the head whose score changed most, as the archived tables say.
    diffs = [
        (abs(tables[1].scores[p][i, h] - tables[0].scores[p][i, h]), p, i, h)
        for p in set(tables[0].scores) - UNBOUNDED
        for i in range(2)
        for h in range(4)
        if np.isfinite(tables[0].scores[p][i, h]) and np.isfinite(tables[1].scores[p][i, h])
    ]
    _, pattern, layer, head = max(diffs)
    assert lines[3].split()[:3] == [pattern, str(layer), str(head)]
    assert f"logged attnlog_compare/cmp.html to MLflow run {a}" in printed

    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org", "")
    client = MlflowClient(uri)
    for run_id in (a, b):
        files = [f.path for f in client.list_artifacts(run_id, "attnlog_compare")]
        assert files == ["attnlog_compare/cmp.html"]

    browser.get(out.as_uri())
    state = wait_for(
        browser,
        "const imgs = Array.from(document.images);"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 100) ?"
        " {imgs: imgs.length, rows: document.querySelectorAll('#changed tr').length,"
        "  first: document.querySelector('#changed tr:nth-child(2) td').textContent} : null;",
    )
    assert state["imgs"] % 3 == 0 and state["imgs"] >= 3  # A | B | B - A per pattern
    assert state["rows"] == 1 + 10 and state["first"] == pattern


def test_compare_logdirs_page_and_errors(minilm, tmp_path, capsys):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    runs = []
    for name, text in (("a", "The cat sat."), ("b", "A dog barked loudly.")):
        with AttentionLogger(
            model, tokenizer, [text], sinks=[], logdir=tmp_path / name, views=()
        ) as log:
            log.log(0)
        runs.append(str(tmp_path / name))
    out = tmp_path / "page.html"
    assert main(["compare", *runs, "--out", str(out), "--top", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").count("data:image/png;base64,") >= 3
    assert main(["compare", runs[0], "no-such-run!"]) == 1
    assert "neither a folder nor an MLflow run id" in capsys.readouterr().err
