"""`attnlog compare`: two MLflow runs of a real sqlite store (and two logdirs) give one
self-contained page that draws in Chromium and is logged to both runs."""

from __future__ import annotations

import os

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


def test_a_logdir_and_an_mlflow_run_of_the_same_scores_compare_alike(tmp_path, capsys):
    """One table for every kind of run: identical patterns named together, no difference found."""
    from test_sinks_contract import make_snapshot, make_table

    from attnlog.compare import compare
    from attnlog.sinks.archive import ArchiveSink
    from attnlog.sinks.mlflow import MLflowSink

    table = make_table(10)
    table.scores["sink"] = table.scores["cls"].copy()  # BERT: [CLS] is the first token
    ArchiveSink(tmp_path / "run").log_archive(make_snapshot(10), table, 10)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("same", artifact_location=str(tmp_path / "art"))
    sink = MLflowSink(uri, experiment_name="same", spool_dir=tmp_path / "spool")
    sink.log_scores(table, 10)
    sink.close()

    for b in (str(tmp_path / "run"), sink.run_id):
        text = compare(str(tmp_path / "run"), b, top=50, tracking_uri=uri)
        assert text.splitlines()[0] == f"A: {tmp_path / 'run'} (step 10)"
        assert "cls (= sink)" in text and "\n  sink " not in text
        assert text.endswith("(every score is the same in both runs)")
        assert (
            main(["compare", str(tmp_path / "run"), b, "--top", "50", "--tracking-uri", uri]) == 0
        )
        assert capsys.readouterr().out.strip() == text


def test_metric_names_that_ask_for_absurd_sizes_are_refused(tmp_path):
    """`attn.sink.L200000H200000` asked for a 149 GiB matrix; now a message. The command runs
    with its address space capped at 8 GiB, so a regression fails (MemoryError) without
    taking the machine's memory."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("absurd", artifact_location=str(tmp_path / "art"))
    normal = client.create_run(experiment).info.run_id
    client.log_metric(normal, "attn.sink.L0H0", 0.5)
    runs = {}
    for name, metrics in {
        "huge": {"attn.sink.L0H0": 0.5, "attn.sink.L200000H200000": 0.5},
        "wide": {f"attn.p{i}.L4095H4095": 0.5 for i in range(2)},  # 2 x 4096 x 4096 cells
    }.items():
        runs[name] = client.create_run(experiment).info.run_id
        for key, value in metrics.items():
            client.log_metric(runs[name], key, value)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    root = str(Path(__file__).resolve().parents[1])  # this checkout's attnlog, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    expected = {"huge": "at most 4096 layers and 4096 heads", "wide": "over attnlog's limit"}
    for name, run_id in runs.items():
        result = subprocess.run(
            [sys.executable, "-m", "attnlog.cli", "compare", normal, run_id, "--tracking-uri", uri],
            capture_output=True, text=True, timeout=300, preexec_fn=cap, env=env,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr[-2000:]
        assert expected[name] in result.stderr and "Traceback" not in result.stderr
