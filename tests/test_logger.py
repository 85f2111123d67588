"""AttentionLogger on the real MiniLM: events reach sinks in order, and nothing breaks training."""

from __future__ import annotations

import copy
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from test_writer import wait_for

from attnlog import AttentionLogger
from attnlog.layout import page_path, plugin_dir, read_index
from attnlog.sinks.base import head_metrics, pattern_scalars
from attnlog.sinks.memory import MemorySink

PROBES = ["The cat sat on the mat.", ("The cat sat.", "It was happy.")]


def make_logger(minilm, logdir, sinks, **options) -> AttentionLogger:
    model, tokenizer = minilm
    options.setdefault("views", ())
    return AttentionLogger(model, tokenizer, PROBES, sinks=sinks, logdir=logdir, **options)


class BrokenSink(MemorySink):
    """A sink whose backend fails in every call (a full disk, a dead server)."""

    name = "broken"

    def _record(self, method, **args):
        raise OSError(f"disk on fire in {method}")

    def flush(self):
        raise OSError("disk on fire in flush")

    def close(self):
        raise OSError("disk on fire in close")


class BlockingSink(MemorySink):
    """Holds the worker in its first call until the test releases it: a backend that hangs."""

    name = "blocking"

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def _record(self, method, **args):
        self.entered.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the sink")
        super()._record(method, **args)


class ThreadNotingSink(MemorySink):
    """Notes the thread that writes each event's scores."""

    name = "threads"

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[threading.Thread] = []

    def log_scores(self, table, step) -> None:
        self.threads.append(threading.current_thread())
        super().log_scores(table, step)


def attnlog_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_events_reach_every_sink_in_order(minilm, tmp_path):
    first, second = MemorySink(), MemorySink()
    with make_logger(minilm, tmp_path, [first, second], views=("head",)) as logger:
        assert logger.log(0) is True
        assert logger.log(5) is True
        assert logger.flush() is True
        assert first.steps("log_archive") == [0, 5]  # written by flush, before close
    assert logger.log(10) is False  # closed: ignored, not raised

    for sink in (first, second):
        methods = [c.method for c in sink.calls]
        per_probe = ["log_images"]  # streamed: one probe's images in memory at a time
        per_step = ["log_scores", *per_probe, *per_probe, "log_html", "log_images", "log_archive"]
        assert methods == ["log_settings", *per_step, *per_step]
        assert sink.steps("log_scores") == [0, 5]
        assert sink.closed and sink.flushes >= 1
    settings = first.of("log_settings")[0].args["settings"]
    assert settings["probe.p1_the_cat_sat"] == "The cat sat. ||| It was happy."
    files = {k for call in first.of("log_html")[1:] for k in call.args["files"]}
    assert files == {page_path(5)}  # one page: every probe and view
    images = {k for call in first.of("log_images")[:3] for k in call.args["images"]}
    assert {"attention/p0_the_cat_sat/model", "attention/p1_the_cat_sat/model",
            "patterns/cls"} <= images  # fmt: skip
    assert [e["step"] for e in read_index(tmp_path)] == [0, 5]  # the archive is always written
    assert logger.logged_steps == {0, 5}
    assert logger.stats["events"] == 2
    assert not [k for k in logger.stats if k.startswith("errors")]


def test_a_failing_sink_is_contained_counted_and_reported_once(minilm, tmp_path):
    broken, healthy = BrokenSink(), MemorySink()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        logger = make_logger(minilm, tmp_path, [broken, healthy])
        assert logger.log(0) is True  # never raises into the training thread
        assert logger.log(1) is True
        logger.flush()
        logger.close()

    reports = attnlog_warnings(record)
    assert len(reports) == 1, reports
    assert "broken.log_settings failed: OSError: disk on fire in log_settings" in reports[0]
    # every failed call counted: what the healthy sink received, plus its flushes and close
    assert logger.stats["errors.broken"] == len(healthy.calls) + healthy.flushes + 1
    assert healthy.steps("log_archive") == [0, 1]
    assert [e["step"] for e in read_index(tmp_path)] == [0, 1]


def test_strict_raises_the_sink_error(minilm, tmp_path):
    logger = make_logger(minilm, tmp_path, [BrokenSink()], strict=True)
    logger.log(0)
    with pytest.raises(OSError, match="disk on fire"):
        logger.flush()
    with pytest.raises(OSError, match="disk on fire"):
        logger.close()  # closing raises too, and leaves nothing for the exit hook


def test_unwritable_logdir_fails_at_construction_naming_the_folder(minilm, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the log folder should go")
    logdir = blocker / "runs"
    with pytest.raises(ValueError, match="not_a_folder") as info:
        make_logger(minilm, logdir, ["tensorboard"])
    assert str(logdir) in str(info.value)


def test_a_write_error_mid_run_is_contained_and_retried(minilm, tmp_path):
    memory = MemorySink()
    archive = plugin_dir(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with make_logger(minilm, tmp_path, [memory]) as logger:
            logger.log(0)
            logger.flush()
            shutil.rmtree(archive)
            archive.write_text("the archive folder became a file")  # every write now fails
            assert logger.log(1) is True
            logger.flush()
            assert logger.stats["errors.archive"] == 1
            archive.unlink()  # the disk is back: the next event is archived again
            archive.mkdir()
            logger.log(2)
    assert memory.steps("log_archive") == [0, 1, 2]
    assert [e["step"] for e in read_index(tmp_path)] == [2]
    assert (archive / "step_00000002.npz").is_file()
    [report] = attnlog_warnings(record)
    assert "archive.log_archive failed" in report


def test_nan_attention_is_logged_without_nan_values(minilm, tmp_path):
    model, tokenizer = minilm
    broken = copy.deepcopy(model)
    with torch.no_grad():  # layer 3 onwards: NaN attention
        broken.encoder.layer[3].attention.self.query.weight.fill_(float("nan"))
    memory = MemorySink()
    with AttentionLogger(
        broken, tokenizer, PROBES, sinks=[memory], logdir=tmp_path, views=()
    ) as logger:
        assert logger.log(0) is True
    assert not [k for k in logger.stats if k.startswith("errors")]

    table = memory.of("log_scores")[0].args["table"]
    values = {**pattern_scalars(table), **head_metrics(table)}  # what TensorBoard/MLflow get
    assert values and all(np.isfinite(v) for v in values.values())
    assert "patterns/cls/layer_2" in values
    assert "patterns/cls/layer_3" not in values  # undefined: left out, not logged as NaN
    assert "attn.cls.L3H0" not in values
    images = memory.of("log_images")[0].args["images"]
    assert "attention/p0_the_cat_sat/model" in images


def test_queue_overflow_waits_on_disk_in_order_and_drops_nothing(minilm, tmp_path):
    sink = BlockingSink()
    logger = make_logger(minilm, tmp_path, [sink], queue_size=1, archive=False)
    outbox = tmp_path / "attnlog-outbox"
    try:
        logger.log(0)
        assert sink.entered.wait(timeout=60)  # the worker holds step 0 inside the sink
        for step in (1, 2, 3, 4):
            assert logger.log(step) is True  # training does not wait
        spilled = lambda: sorted(p.name for p in outbox.glob("*/*.frame"))  # noqa: E731
        names = wait_for(lambda: len(spilled()) == 3 and spilled(), "the overflow on disk")
        assert [n.split("-")[1] for n in names] == ["step_00000002.frame", "step_00000003.frame",
                                                    "step_00000004.frame"]  # fmt: skip
    finally:
        sink.release.set()
    assert logger.close() is True
    assert sink.steps("log_archive") == [0, 1, 2, 3, 4]
    assert logger.stats["dropped"] == 0 and logger.stats["lost"] == 0
    assert not outbox.exists()  # emptied and removed
    assert logger.logged_steps == {0, 1, 2, 3, 4}


def test_other_processes_write_nothing_and_start_no_worker(minilm, tmp_path):
    before = {t.ident for t in threading.enumerate()}
    logdir = tmp_path / "run"
    logger = make_logger(minilm, logdir, ["tensorboard", "archive"], is_main_process=False)
    assert logger.log(0) is False
    logger.flush()
    logger.close()
    assert logger.sinks == []
    assert not logdir.exists()
    started = [t for t in threading.enumerate() if t.ident not in before]
    assert not [t for t in started if t.name == "attnlog-worker"]


@pytest.mark.parametrize(
    "option, choice",
    [
        ({"patterns": ["cls", "no_such_pattern"]}, "prev_token"),
        ({"views": ["head", "no_such_view"]}, "neuron"),
        ({"sinks": ["tensorboard", "no_such_sink"]}, "mlflow"),
    ],
)
def test_unknown_names_fail_fast_listing_the_choices(minilm, tmp_path, option, choice):
    option = {"sinks": [], **option}
    with pytest.raises(ValueError, match="no_such_") as info:
        make_logger(minilm, tmp_path / "run", **option)
    assert choice in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_model_without_attention_fails_at_construction(minilm, tmp_path):
    from transformers import MambaConfig, MambaModel

    from attnlog.capturing import AttentionUnavailableError

    _, tokenizer = minilm
    config = MambaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1)
    model = MambaModel(config)  # a state-space model: no attention to log
    with pytest.raises(AttentionUnavailableError, match="MambaModel returned no attention"):
        AttentionLogger(model, tokenizer, PROBES, sinks=["tensorboard"], logdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_queued_events_are_written_when_the_program_exits_without_close(minilm_path, tmp_path):
    """A training script that crashes never calls close(); what was logged still lands."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel, AutoTokenizer
        from attnlog import AttentionLogger
        tok = AutoTokenizer.from_pretrained({minilm_path!r})
        model = AutoModel.from_pretrained({minilm_path!r})
        log = AttentionLogger(model, tok, ["The cat sat."], sinks=[], logdir={str(tmp_path)!r}, views=())
        log.log(0)
        log.log(1)
        raise SystemExit("training crashed")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "training crashed" in done.stderr
    assert [e["step"] for e in read_index(tmp_path)] == [0, 1]


# ---- input checks: fail at construction naming the fix, or work --------------------------------


def test_no_patterns_fails_at_construction(minilm, tmp_path):
    with pytest.raises(ValueError, match=r"patterns=\[\] scores nothing; pass None for all"):
        make_logger(minilm, tmp_path, [], patterns=[])


def test_one_view_may_be_given_as_a_string(minilm, tmp_path):
    memory = MemorySink()
    with make_logger(minilm, tmp_path, [memory], views="head", archive=False) as logger:
        assert logger.views == ("head",)
        logger.log(0)
    files = {k for call in memory.of("log_html") for k in call.args["files"]}
    assert files == {page_path(0)}


@pytest.mark.parametrize("step", ["5", 1.5, None, True])
def test_a_step_that_is_not_an_integer_is_a_type_error_at_the_call(minilm, tmp_path, step):
    memory = MemorySink()
    with make_logger(minilm, tmp_path, [memory], archive=False) as logger:
        with pytest.raises(TypeError, match="log\\(step\\) needs an integer training step"):
            logger.log(step)
        with pytest.raises(ValueError, match="needs a training step >= 0"):
            logger.log(-1)
        assert logger.log(np.int64(3)) and logger.log(torch.tensor(4))  # integers of any kind
    assert memory.steps("log_scores") == [3, 4]


def test_a_misspelt_sink_option_fails_at_construction(minilm, tmp_path):
    with pytest.raises(ValueError, match="unknown sink 'tensorbord'"):
        make_logger(minilm, tmp_path, ["tensorboard"], sink_options={"tensorbord": {}})
    with pytest.raises(TypeError, match="sink_options\\['tensorboard'\\].*max_side"):
        make_logger(
            minilm, tmp_path, ["tensorboard"], sink_options={"tensorboard": {"max_side": 9}}
        )


def test_default_sinks_are_those_installed_and_say_so(minilm_path, tmp_path):
    """A base install (mlflow hidden from the import system) logs to TensorBoard and the archive."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, warnings
        class Hide:  # mlflow is not installed, as far as this process can tell
            def __init__(self, finder): self.finder = finder
            def __getattr__(self, name): return getattr(self.finder, name)
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "mlflow":
                    return None
                return self.finder.find_spec(name, path, target)
        sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        warnings.simplefilter("always")
        from transformers import AutoModel, AutoTokenizer
        from attnlog import AttentionLogger
        tok = AutoTokenizer.from_pretrained({minilm_path!r})
        model = AutoModel.from_pretrained({minilm_path!r})
        with AttentionLogger(model, tok, ["The cat sat."], views=()) as log:
            log.log(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "logging to tensorboard, the archive (mlflow not installed" in done.stderr
    assert done.stderr.count("mlflow not installed") == 1  # said once
    logdir = tmp_path / "runs" / "attnlog"
    assert [e["step"] for e in read_index(logdir)] == [0]
    assert list(logdir.glob("events.out.tfevents.*"))
    assert not (tmp_path / "mlruns").exists()


def test_views_every_k_events_writes_pages_at_every_kth_event_and_the_rest_every_time(
    minilm, tmp_path
):
    """For runs that log often: the page of views at events 0, 2, 4; scores, heatmaps and the
    archive at every event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "run"
    with make_logger(minilm, logdir, ["tensorboard"], views=("head",), views_every=2) as logger:
        for step in range(5):
            assert logger.log(step * 10)
        assert logger.flush(timeout=300)
        assert logger.settings()["views_every"] == "2"
    pages = sorted(p.name for p in (plugin_dir(logdir) / "html" / "attention").glob("*.html"))
    assert pages == [page_path(s).split("/")[-1] for s in (0, 20, 40)]
    assert [e["step"] for e in read_index(logdir)] == [0, 10, 20, 30, 40]
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("patterns/delimiter/max")] == [0, 10, 20, 30, 40]
    assert [e.step for e in events.Images("patterns/delimiter")] == [0, 10, 20, 30, 40]


def test_views_every_must_be_a_positive_integer(minilm, tmp_path):
    with pytest.raises(ValueError, match="views_every must be a positive integer"):
        make_logger(minilm, tmp_path, [], views_every=0)


def test_the_thread_writer_keeps_no_thread_that_scored_an_event(minilm, tmp_path):
    """Torch's OpenMP runtime keeps a team of threads for each thread that ran a parallel op.
    While a second team lives it stops spinning between parallel regions: every CPU training
    step ran about 23 % slower for the thread writer's whole life. So each event is written on
    a thread that ends with it, and training keeps the only team."""
    sink = ThreadNotingSink()
    with make_logger(minilm, tmp_path, [sink], writer="thread") as logger:
        for step in (0, 1):
            logger.log(step)
            logger.flush()
        first, second = sink.threads
        assert first is not second
        assert not first.is_alive() and not second.is_alive()
        assert threading.current_thread() not in sink.threads
    assert sink.steps("log_scores") == [0, 1]


@pytest.fixture
def torch_on_every_core():
    """torch's intra-op threads on every core this process may use, as on a CPU box."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    yield
    torch.set_num_threads(before)


def test_auto_writer_is_the_thread_when_cpu_training_fills_every_core(
    minilm, tmp_path, torch_on_every_core
):
    """No core is left for a writer process: its start-up and rendering would come out of
    training anyway. The thread is chosen at the first event, and writes everything."""
    from attnlog.writer import ThreadWriter
    from attnlog.writer.plan import choose_writer

    model, _ = minilm
    assert choose_writer("auto", model) == "thread"
    with make_logger(minilm, tmp_path, ["tensorboard"]) as logger:
        assert logger._writer is None  # not before the first event
        assert logger.log(0) is True
        assert isinstance(logger._writer, ThreadWriter) and logger.writer_pid is None
        logger.log(1)
    assert [e["step"] for e in read_index(tmp_path)] == [0, 1]


def test_auto_writer_is_the_process_where_it_has_a_core_of_its_own(minilm):
    """Beside an accelerator (here a model on the meta device stands for one), or when torch
    leaves cores free; an explicit choice is kept."""
    from attnlog.writer.plan import choose_writer

    model, _ = minilm
    assert choose_writer("auto", torch.nn.Linear(2, 2, device="meta")) == "process"
    assert choose_writer("auto", object()) == "process"  # no parameters to tell
    assert choose_writer("process", model) == "process"
    assert choose_writer("thread", torch.nn.Linear(2, 2, device="meta")) == "thread"
    if len(os.sched_getaffinity(0)) > 1:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert choose_writer("auto", model) == "process"
        finally:
            torch.set_num_threads(before)


def test_a_logger_that_never_logged_leaves_its_logdir_free(minilm, tmp_path, torch_on_every_core):
    """With `auto` on the CPU the writer is built at the first event; closing before it still
    releases the archive for the next training."""
    make_logger(minilm, tmp_path, ["tensorboard"]).close()
    with make_logger(minilm, tmp_path, ["tensorboard"]) as second:
        assert second.log(0) is True
    assert [e["step"] for e in read_index(tmp_path)] == [0]


def test_the_trainer_starts_no_spare_writer_process_when_auto_picks_the_thread(
    minilm, tmp_path, torch_on_every_core
):
    """A spare process would import torch and MLflow for nothing, and idle on ~0.5 GiB."""
    from transformers import Trainer, TrainingArguments

    from attnlog import AttentionLoggerCallback
    from attnlog.writer import process

    model, tokenizer = minilm
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    Trainer(model=model, args=args, processing_class=tokenizer,
            callbacks=[AttentionLoggerCallback()])  # fmt: skip
    assert process._spare is None
    Trainer(model=model, args=args, processing_class=tokenizer,
            callbacks=[AttentionLoggerCallback(writer="process")])  # fmt: skip
    spare = process._spare
    assert spare is not None and spare.poll() is None
    process._stop(spare)
    process._spare = None
    assert spare.wait(timeout=120) == 0


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)  # fmt: skip
    return BertModel(config)


def logged_attention(memory: MemorySink, step: int) -> np.ndarray:
    [call] = [c for c in memory.of("log_archive") if c.args["step"] == step]
    return np.asarray(call.args["snapshot"].probes[0].attention)


def test_step_0_takes_the_construction_check_while_the_weights_are_unchanged(minilm, tmp_path):
    _, tokenizer = minilm
    model = tiny_bert()
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    memory = MemorySink()
    with AttentionLogger(model, tokenizer, PROBES, sinks=[memory], logdir=tmp_path / "a",
                         views=(), writer="thread") as log:  # fmt: skip
        assert len(passes) == 1  # the check at construction
        log.log(0)
        assert len(passes) == 1  # a Trainer logs step 0 right after: one pass, not two
        log.log(1)
        assert len(passes) == 2
    assert memory.steps("log_archive") == [0, 1]
    np.testing.assert_array_equal(logged_attention(memory, 0), logged_attention(memory, 1))


@pytest.mark.parametrize(
    "change",
    ["an optimizer step", "another dtype"],
)
def test_a_first_log_after_the_weights_changed_captures_them_anew(minilm, tmp_path, change):
    _, tokenizer = minilm
    model = tiny_bert()
    memory = MemorySink()
    with AttentionLogger(model, tokenizer, PROBES, sinks=[memory], logdir=tmp_path / "a",
                         views=(), writer="thread") as log:  # fmt: skip
        if change == "an optimizer step":
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            model(
                **tokenizer(["Change the weights."], return_tensors="pt")
            ).last_hidden_state.sum().backward()
            optimizer.step()
        else:
            model.double()
        log.log(0)
    fresh = MemorySink()
    with AttentionLogger(model, tokenizer, PROBES, sinks=[fresh], logdir=tmp_path / "b",
                         views=(), writer="thread") as log:  # fmt: skip
        log.log(0)
    np.testing.assert_array_equal(logged_attention(memory, 0), logged_attention(fresh, 0))
