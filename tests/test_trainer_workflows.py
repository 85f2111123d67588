"""The Trainer callback in the workflows around a plain `train()`: early stopping with the best
model reloaded, a callback reused after an interrupted run, a hyper-parameter search, no
tokenizer, and what it says when training starts. A tiny random BERT (the shipped MiniLM's
tokenizer) keeps every run to a few seconds; archives, TensorBoard events and the MLflow store
are read back."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import attnlog  # noqa: E402
from attnlog import AttentionLogger, AttentionLoggerCallback, notes  # noqa: E402
from attnlog.layout import read_index  # noqa: E402

PROBES = ["The cat sat on the mat.", ("The cat sat.", "It was happy.")]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_model(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    """Two layers of two heads, random weights (wide enough that attention is far from uniform),
    no `name_or_path`."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, num_labels=2, initializer_range=0.2)  # fmt: skip
    return BertForSequenceClassification(config)


def examples(tokenizer) -> list[dict]:
    texts = [f"The {animal} number {i} sat." for i in range(8) for animal in ("cat", "dog")]
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int("cat" in text)}
        for ids, mask, text in zip(encoded["input_ids"], encoded["attention_mask"], texts)
    ]


def arguments(folder: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(folder / "out"), per_device_train_batch_size=4,
                   learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                   use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**options, **overrides})


def fresh_capture(model, tokenizer, folder: Path, step: int) -> np.ndarray:
    """The probes' attention of `model` as it is now, through a logger of its own."""
    logger = AttentionLogger(model, tokenizer, PROBES, sinks=[], logdir=folder, views=(),
                             patterns=["cls"], writer="thread")  # fmt: skip
    logger.log(step)
    logger.close()
    return attention(folder, step)


def attention(logdir: Path, step: int) -> np.ndarray:
    """The first probe's archived attention at `step`, `[L, H, n, n]`."""
    return np.asarray(attnlog.load(logdir, step=step).probes[0].attention, dtype=np.float32)


def callback(**options) -> AttentionLoggerCallback:
    return AttentionLoggerCallback(probes=PROBES, views=(), patterns=["cls"], **options)


# ---- early stopping with load_best_model_at_end ---------------------------------------------------


class ScriptedMetric:
    """compute_metrics whose `score` is best at the first evaluation, then only gets worse."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction) -> dict[str, float]:
        self.calls += 1
        return {"score": 1.0 / self.calls}


class Weights(TrainerCallback):
    """A copy of the model at the end of every step."""

    def __init__(self) -> None:
        self.at: dict[int, torch.nn.Module] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = copy.deepcopy(model)


@pytest.fixture(scope="module", params=["steps", "best"])
def early_stopped(request, tokenizer, tmp_path_factory):
    """Evaluates every 2 steps; the best is step 2; patience 2 stops at step 6, which is not on
    the logging interval (4). Our callback comes before EarlyStoppingCallback, so it sees the
    stop only after its own on_evaluate; saving only the best, no on_save follows either."""
    folder = tmp_path_factory.mktemp("early")
    data = examples(tokenizer)
    args = arguments(folder, max_steps=20, eval_strategy="steps", eval_steps=2, save_steps=2,
                     save_strategy=request.param, load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=True)  # fmt: skip
    weights = Weights()
    trainer = Trainer(
        model=tiny_model(tokenizer), args=args, train_dataset=data, eval_dataset=data[:4],
        processing_class=tokenizer, compute_metrics=ScriptedMetric(),
        callbacks=[callback(every_n_steps=4, logdir=folder / "logs"),
                   EarlyStoppingCallback(early_stopping_patience=2), weights],
    )  # fmt: skip
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        trainer.train()
    return folder, trainer, weights.at, said.getvalue()


def test_early_stopping_logs_the_last_step_with_its_own_weights(early_stopped, tokenizer):
    folder, trainer, weights, _ = early_stopped
    assert trainer.state.global_step == 6
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert [e["step"] for e in read_index(folder / "logs")] == [0, 4, 6]

    own = fresh_capture(weights[6], tokenizer, folder / "own", 6)
    best = fresh_capture(weights[2], tokenizer, folder / "best", 2)
    logged = attention(folder / "logs", 6)
    assert np.abs(logged - own).max() < 2e-3  # the archive keeps float16
    assert np.abs(logged - best).max() > 2e-2  # not the best checkpoint's weights
    # ...which the Trainer did reload: the scenario where a late capture would mislabel them
    reloaded = fresh_capture(trainer.model, tokenizer, folder / "reloaded", 2)
    assert np.abs(reloaded - best).max() < 2e-3


def test_start_of_training_names_the_sinks_and_the_command_that_opens_them(early_stopped):
    folder, _, _, said = early_stopped
    [line] = [line for line in said.splitlines() if line.startswith("attnlog: logging")]
    logs = (folder / "logs").absolute()
    assert "every 4 steps to the archive only" in line
    assert 'report_to chose no tracker: add TrainingArguments(report_to=["tensorboard"' in line
    assert f"`tensorboard --logdir {logs}`" in line and "<logdir>" not in line
    assert str(logs / "plugins" / "attnlog") in line


# ---- a callback reused after an interrupted train() -----------------------------------------------


class Boom(TrainerCallback):
    """An exception in the middle of training (as Ctrl-C or a pruned trial would end it)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("boom")


@pytest.fixture(scope="module")
def reused(tokenizer, tmp_path_factory):
    """One callback: a first train() that dies at step 3, then a new model and a new Trainer."""
    folder = tmp_path_factory.mktemp("reused")
    data = examples(tokenizer)
    shared = callback(every_n_steps=2)  # logdir: each Trainer's output_dir/runs/attnlog
    first = Trainer(model=tiny_model(tokenizer, seed=1), args=arguments(folder / "first", max_steps=6),
                    train_dataset=data, processing_class=tokenizer, callbacks=[shared, Boom()])  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        first.train()
    model = tiny_model(tokenizer, seed=2)
    initial = copy.deepcopy(model)
    second = Trainer(model=model, args=arguments(folder / "second", max_steps=4),
                     train_dataset=data, processing_class=tokenizer, callbacks=[shared])  # fmt: skip
    second.train()
    return folder, first.model, initial


def test_a_reused_callback_logs_the_new_model_at_every_step(reused, tokenizer):
    folder, first_model, initial = reused
    logs = folder / "second" / "out" / "runs" / "attnlog"
    assert [e["step"] for e in read_index(logs)] == [0, 2, 4]  # none skipped as "logged"
    logged = attention(logs, 0)
    assert np.abs(logged - fresh_capture(initial, tokenizer, folder / "initial", 0)).max() < 2e-3
    old = fresh_capture(first_model, tokenizer, folder / "old", 0)
    assert np.abs(logged - old).max() > 2e-2


def test_the_interrupted_runs_queued_steps_are_still_written(reused):
    folder, _, _ = reused
    assert [e["step"] for e in read_index(folder / "first" / "out" / "runs" / "attnlog")] == [0, 2]


# ---- no tokenizer ----------------------------------------------------------------------------------


def test_no_tokenizer_fails_when_the_trainer_is_built(tokenizer, tmp_path, monkeypatch):
    """Before MLflowCallback starts a run: no empty run is left behind."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match=r"processing_class=tokenizer.*no name_or_path"):
        Trainer(model=tiny_model(tokenizer), args=arguments(tmp_path, report_to=["mlflow"]),
                train_dataset=examples(tokenizer), callbacks=[AttentionLoggerCallback()])  # fmt: skip
    assert not (tmp_path / "mlflow.db").exists()


# ---- hyper-parameter search ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tokenizer, tmp_path_factory):
    """Two optuna trials of 3 steps, logging every 2 steps, to TensorBoard and MLflow."""
    pytest.importorskip("optuna")
    folder = tmp_path_factory.mktemp("search")
    data = examples(tokenizer)
    args = arguments(folder, max_steps=3, report_to=["tensorboard", "mlflow"],
                     eval_strategy="steps", eval_steps=3)  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        env.setenv("TENSORBOARD_LOGGING_DIR", str(folder / "tb"))
        trainer = Trainer(model_init=lambda: tiny_model(tokenizer), args=args, train_dataset=data,
                          eval_dataset=data[:4], processing_class=tokenizer,
                          callbacks=[callback(every_n_steps=2)])  # fmt: skip
        notes.forget("tensorboard/images-hint")  # said once per process: by the thread writer here
        with stderr_to(folder / "stderr.txt"):  # the writer processes' too
            trainer.hyperparameter_search(
                hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2)},
                backend="optuna", n_trials=2, direction="minimize",
            )  # fmt: skip
    return folder


@contextlib.contextmanager
def stderr_to(path: Path):
    """This process's `sys.stderr` and file descriptor 2 (inherited by child processes)."""
    saved = os.dup(2)
    # The thread writer's notes go to the "attnlog" logger, which a script without a logging
    # set-up prints to stderr (logging's last resort); pytest's own handler would take them.
    said = logging.StreamHandler()
    with open(path, "w") as file, contextlib.redirect_stderr(file):
        os.dup2(file.fileno(), 2)
        said.setStream(file)
        logging.getLogger("attnlog").addHandler(said)
        try:
            yield
        finally:
            logging.getLogger("attnlog").removeHandler(said)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def test_every_trial_has_its_own_archive_and_tensorboard_run(searched):
    trials = sorted(p.name for p in (searched / "tb").iterdir() if p.is_dir())
    assert trials == ["trial_0", "trial_1"]
    for trial in trials:
        logdir = searched / "tb" / trial
        assert [e["step"] for e in read_index(logdir)] == [0, 2, 3], trial
        events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("patterns/cls/max")] == [0, 2, 3], trial
    # different learning rates: the trials part after step 0
    assert (
        np.abs(attention(searched / "tb/trial_0", 3) - attention(searched / "tb/trial_1", 3)).max()
        > 0
    )


def test_each_trial_says_where_it_logs_with_real_folders(searched):
    said = (searched / "stderr.txt").read_text()
    starts = [line for line in said.splitlines() if line.startswith("attnlog: logging")]
    assert len(starts) == 2
    for line, trial in zip(starts, ("trial_0", "trial_1")):
        logdir = searched / "tb" / trial
        assert "to tensorboard, mlflow and the archive" in line
        assert f"`tensorboard --logdir {logdir}`" in line
    hints = [line for line in said.splitlines() if "--samples_per_plugin" in line]
    assert hints and "<logdir>" not in "".join(hints)
    assert f"--logdir {searched / 'tb' / 'trial_0'} " in hints[0]


def test_every_trials_attention_is_in_that_trials_mlflow_run(searched):
    client = MlflowClient(f"sqlite:///{searched / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "attn.cls.L0")]
             for r in runs}  # fmt: skip
    trained = [r.info.run_id for r in runs if "loss" in r.data.metrics]  # the Trainer's runs
    assert len(trained) == 2
    assert {steps[run] == [0, 2, 3] for run in trained} == {True}
    assert [run for run in steps if steps[run] and run not in trained] == []  # no run of its own
