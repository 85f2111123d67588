"""Every sink takes the whole `Sink` interface with realistic inputs, keeps what it stores (read
back from the real backend), and has idempotent flush/close; the base class and duck typing.

The builders here (`make_snapshot`, `make_table`, `make_images`, `make_html`) are shared by the
sink-specific test files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnlog.layout import html_dir, html_path, read_index, tb_attention_tag, tb_pattern_tag
from attnlog.patterns import ScoreTable
from attnlog.sinks.base import SINK_METHODS, Sink, head_metrics, pattern_scalars, sink_factory
from attnlog.snapshot import ProbeAttention, Snapshot

LAYERS, HEADS = 2, 3
PROBES = {
    "cat": (["[CLS]", "the", "cat", "sat", ".", "[SEP]"], False),
    "pair": (["[CLS]", "it", "rained", "[SEP]", "we", "stayed", "[SEP]"], True),
}


def make_snapshot(step: int = 100, layers: int = LAYERS, heads: int = HEADS) -> Snapshot:
    """Two probes (one sentence pair) with softmax-normalised random attention `[L, H, n, n]`."""
    rng = np.random.default_rng(step)
    probes = []
    for name, (tokens, is_pair) in PROBES.items():
        n = len(tokens)
        logits = rng.normal(size=(layers, heads, n, n))
        attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        sep = [i for i, t in enumerate(tokens) if t == "[SEP]"]
        segment = (np.arange(n) > sep[0]).astype(np.int64) if is_pair else np.zeros(n, np.int64)
        probes.append(
            ProbeAttention(
                name=name,
                tokens=tokens,
                attention=attention.astype(np.float32),
                special=np.array([t.startswith("[") for t in tokens]),
                punct=np.array([t == "." for t in tokens]),
                segment=segment,
                token_ids=np.arange(100, 100 + n),
                word_ids=np.array([-1, *range(n - 2), -1]),
                is_pair=is_pair,
                scaling=0.125,
            )
        )
    return Snapshot(step=step, probes=probes, model_type="bert", meta={"seed": 0})


def make_table(step: int = 100, layers: int = LAYERS, heads: int = HEADS) -> ScoreTable:
    """Scores `[L, H]` for three patterns; `cross_sentence` undefined (NaN) in the last layer."""
    rng = np.random.default_rng(1000 + step)
    scores = {p: rng.random((layers, heads)).astype(np.float32) for p in ("cls", "sep", "prev")}
    scores["cross_sentence"] = rng.random((layers, heads)).astype(np.float32)
    scores["cross_sentence"][-1] = np.nan
    per_probe = {name: {p: m.copy() for p, m in scores.items()} for name in PROBES}
    labels = np.full((layers, heads), "broad", dtype=object)
    labels[0, 1] = "[SEP]"
    alerts = [f"step {step}: layer 0 head 1 attends to [SEP] ({scores['sep'][0, 1]:.2f})"]
    return ScoreTable(step, scores, per_probe=per_probe, labels=labels, alerts=alerts)


def make_images(step: int = 100) -> dict[str, np.ndarray]:
    """Heatmap-like uint8 `[height, width, 3]` images under the public tags."""
    rng = np.random.default_rng(step)

    def image(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    return {
        tb_attention_tag("cat", 0): image(40, 60),
        tb_attention_tag("cat"): image(80, 90),
        tb_pattern_tag("cls"): image(20, 30),
    }


def make_html(step: int = 100) -> dict[str, str]:
    return {
        html_path(step, name, view): f"<html><body>{name} {view} {step}</body></html>"
        for name in PROBES
        for view in ("head_view", "model_view")
    }


def build_sink(kind: str, tmp_path):
    """A sink of `kind` writing under `tmp_path` (MLflow: a real sqlite store)."""
    if kind == "mlflow":
        from mlflow import MlflowClient

        uri = f"sqlite:///{tmp_path}/mlflow.db"
        MlflowClient(uri).create_experiment("contract", artifact_location=str(tmp_path / "art"))
        return sink_factory("mlflow")(uri, experiment_name="contract", logdir=tmp_path / "run")
    if kind == "memory":
        return sink_factory("memory")()
    return sink_factory(kind)(tmp_path / "run")


KINDS = ["tensorboard", "mlflow", "archive", "memory"]


def stored(kind: str, sink, tmp_path) -> dict:
    """What the backend of `kind` holds after the contract run: {"steps": ..., ...}."""
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tag = tb_pattern_tag("cls", "max")
        return {
            "steps": [e.step for e in acc.Scalars(tag)],
            "scalar": acc.Scalars(tag)[-1].value,
            "images": set(acc.Tags()["images"]),
            "html": sorted(p.relative_to(html_dir(tmp_path / "run")).as_posix()
                           for p in html_dir(tmp_path / "run").rglob("*.html")),
        }  # fmt: skip
    if kind == "mlflow":
        from mlflow import MlflowClient

        client = MlflowClient(sink.tracking_uri)
        history = client.get_metric_history(sink.run_id, "attn.cls.L0")
        return {"steps": [m.step for m in history], "scalar": history[-1].value,
                "params": client.get_run(sink.run_id).data.params}  # fmt: skip
    if kind == "archive":
        return {"steps": [e["step"] for e in read_index(tmp_path / "run")]}
    return {"steps": sink.steps("log_scores"), "methods": [c.method for c in sink.calls]}


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_is_callable_stores_and_close_is_idempotent(kind, tmp_path):
    sink = build_sink(kind, tmp_path)
    assert isinstance(sink, Sink) and type(sink).__mro__[1] is Sink
    assert sink.name == kind

    sink.log_settings({"every_n_steps": "100", "probes": "cat, pair"})
    for step in (0, 100):
        table = make_table(step)
        sink.log_scores(table, step)
        sink.log_images(make_images(step), step)
        sink.log_html(make_html(step), step)
        sink.log_archive(make_snapshot(step), table, step)
        sink.flush()
    sink.flush()
    sink.close()
    sink.close()
    sink.flush()  # after close: a no-op, not an error

    got = stored(kind, sink, tmp_path)
    assert got["steps"] == [0, 100]
    last = make_table(100)
    if kind == "tensorboard":
        assert got["scalar"] == pytest.approx(pattern_scalars(last)["patterns/cls/max"])
        assert got["images"] == set(make_images())
        assert got["html"] == sorted([*make_html(0), *make_html(100)])
    elif kind == "mlflow":
        assert got["scalar"] == pytest.approx(head_metrics(last)["attn.cls.L0"])
        assert got["params"]["attnlog.every_n_steps"] == "100"
    elif kind == "memory":
        assert got["methods"] == ["log_settings"] + ["log_scores", "log_images", "log_html",
                                                     "log_archive"] * 2  # fmt: skip


class Recorder(Sink):
    """A user sink that stores one thing: everything else falls to the base class's no-ops."""

    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_scores(self, table, step: int) -> None:
        self.steps.append(step)


class DuckSink:
    """Not a subclass, but has a name and every method: accepted as a Sink (structural typing)."""

    name = "duck"

    def log_settings(self, settings):
        pass

    def log_scores(self, table, step):
        pass

    def log_images(self, images, step):
        pass

    def log_html(self, files, step):
        pass

    def log_archive(self, snapshot, table, step):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def test_a_subclass_implements_only_what_it_stores():
    sink = Recorder()
    assert isinstance(sink, Sink)
    sink.log_settings({"a": "b"})
    sink.log_images(make_images(1), 1)
    sink.log_html(make_html(1), 1)
    sink.log_archive(make_snapshot(1), make_table(1), 1)
    sink.log_scores(make_table(1), 1)
    sink.flush()
    sink.close()
    assert sink.steps == [1]
    assert not hasattr(Sink, "log_scalars") and not hasattr(Sink, "log_text")  # never called


def test_duck_typed_sinks_pass_and_partial_ones_do_not():
    from attnlog.sinks.base import missing_methods

    class Partial:
        name = "partial"

        def log_scores(self, table, step):
            pass

    assert missing_methods(DuckSink()) == [] and isinstance(DuckSink(), Sink)
    assert not isinstance(Partial(), Sink)
    assert missing_methods(Partial()) == [m for m in SINK_METHODS if m != "log_scores"]
    assert not isinstance(object(), Sink)


def test_the_logger_takes_subclasses_and_duck_sinks_and_refuses_a_nameless_one():
    from attnlog.logger import check_options
    from attnlog.sinks.base import missing_methods

    class Nameless:
        pass

    for method in SINK_METHODS:
        setattr(Nameless, method, lambda self, *args: None)
    check_options({}, sinks=[Recorder(), DuckSink()])  # accepted before any model exists
    assert missing_methods(Nameless()) == ["name"] and not isinstance(Nameless(), Sink)
    with pytest.raises(TypeError, match="is not a sink name or a Sink"):
        check_options({}, sinks=[Nameless()])  # the writer names its errors by `sink.name`


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow", "archive"])
def test_unwritable_folder_fails_at_construction(kind, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, so nothing can be created below it")
    bad = blocker / "sub"
    with pytest.raises((ValueError, PermissionError), match="file"):
        if kind == "mlflow":
            sink_factory(kind)(f"sqlite:///{tmp_path}/mlflow.db", logdir=bad)
        else:
            sink_factory(kind)(bad)


@pytest.mark.parametrize(
    ("kind", "package"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")]
)
def test_missing_optional_dependency_names_the_install_command(
    kind, package, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, package, None)  # what an absent package looks like
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'attnlog\[{kind}\]'"):
        sink_factory(kind)(tmp_path / "run")


def test_unknown_sink_name_lists_the_choices():
    with pytest.raises(ValueError, match="archive, memory, mlflow, tensorboard"):
        sink_factory("wandb")


def test_sink_modules_import_no_backend():
    code = (
        "import sys, attnlog, attnlog.sinks, attnlog.sinks.tensorboard, attnlog.sinks.mlflow, "
        "attnlog.sinks.archive, attnlog.sinks.memory\n"
        "bad = [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    root = str(Path(__file__).parents[1])  # this checkout's attnlog, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_memory_sink_records_calls_in_order():
    from attnlog.sinks.memory import MemorySink

    sink = MemorySink()
    table = make_table(5)
    images = make_images(5)
    sink.log_scores(table, 5)
    sink.log_images(images, 5)
    images.clear()  # the record is a copy
    sink.flush()
    sink.close()
    assert [c.method for c in sink.calls] == ["log_scores", "log_images"]
    assert sink.of("log_scores")[0].args["table"] is table
    assert set(sink.of("log_images")[0].args["images"]) == set(make_images(5))
    assert sink.steps("log_images") == [5]
    assert sink.flushes == 1 and sink.closed
