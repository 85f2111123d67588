"""AttentionLoggerCallback in a real Trainer on the shipped MiniLM; TensorBoard and MLflow read back.

Trained runs are module-scoped and shared between tests: the whole file trains four short runs.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from attnlog import AttentionLoggerCallback  # noqa: E402
from attnlog.layout import read_index  # noqa: E402
from attnlog.sinks.base import Sink  # noqa: E402

PROBES = ["The cat sat on the mat.", ("The cat sat.", "It was happy.")]
NAMES = ("p0_the_cat_sat", "p1_the_cat_sat")  # the probes' names in tags and paths
N = 3  # every_n_steps of the main run
LAST = 7  # its max_steps: logged at 0, N, 2N and LAST


def examples(tokenizer) -> list[dict]:
    """32 tiny labelled sentences (label: does it mention a cat)."""
    texts = [
        f"The {animal} number {i} sat quietly." for i in range(16) for animal in ("cat", "dog")
    ]
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True)
    return [
        {
            "input_ids": encoded["input_ids"][i],
            "attention_mask": encoded["attention_mask"][i],
            "labels": int("cat" in text),
        }
        for i, text in enumerate(texts)
    ]


def train(minilm_path, folder: Path, *, callback=None, stop=None, resume=None, tokenizer=True,
          tb_env=True, **overrides):  # fmt: skip
    """One Trainer run in `folder`, MLflow in `folder/mlflow.db`; returns the trained model.

    `tokenizer=False`: no processing_class; `tb_env=False`: no TENSORBOARD_LOGGING_DIR."""
    torch.manual_seed(0)
    use_tokenizer = tokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    options = dict(
        output_dir=str(folder / "out"),
        max_steps=LAST,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=["tensorboard", "mlflow"],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    data = examples(tokenizer)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        if tb_env:
            env.setenv("TENSORBOARD_LOGGING_DIR", str(folder / "tb"))
        else:
            env.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        if resume is not None:
            env.setenv("MLFLOW_RUN_ID", resume[1])
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**options),
            train_dataset=data,
            eval_dataset=data[:8],
            processing_class=tokenizer if use_tokenizer else None,
            callbacks=[c for c in (callback, stop) if c is not None],
        )
        trainer.train(resume_from_checkpoint=resume[0] if resume else None)
    return model


def callback(**options) -> AttentionLoggerCallback:
    options = {"every_n_steps": N, "views": ("head",), "patterns": ["cls", "prev_token"],
               "layer_images": True, **options}  # fmt: skip
    return AttentionLoggerCallback(probes=PROBES, **options)


def read_tensorboard(folder: Path) -> dict[str, dict[str, EventAccumulator]]:
    """{event file name: accumulator}, every events file in the folder read back."""
    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        out[path.name] = acc
    return out


def only_run(folder: Path):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def metric_steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def artifact_paths(client, run, path: str | None = None) -> list[str]:
    """Every artifact file under `path`, recursively."""
    out = []
    for info in client.list_artifacts(run.info.run_id, path):
        out += artifact_paths(client, run, info.path) if info.is_dir else [info.path]
    return out


def image_steps(paths: list[str]) -> dict[str, list[int]]:
    """{key: steps} from `log_image` files: `images/<key>+step+<n>+...png`, `/` in the key as `~`
    (MLflow 2 used `%` and `#`)."""
    found: dict[str, list[int]] = {}
    for path in paths:
        match = re.match(r"images/(.+?)[%+]step[%+](\d+)[%+].*\.png$", path)
        if match:
            key = re.sub("[~#]", "/", match[1])
            found.setdefault(key, []).append(int(match[2]))
    return {key: sorted(steps) for key, steps in found.items()}


# ---- the main run: report_to tensorboard + mlflow -----------------------------------------------


@pytest.fixture(scope="module")
def main_run(minilm_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("main")
    train(minilm_path, folder, callback=callback())
    return folder


def test_tensorboard_has_every_tag_at_every_logged_step(main_run):
    files = read_tensorboard(main_run / "tb")
    ours = {name: acc for name, acc in files.items() if "patterns/cls/max" in acc.Tags()["scalars"]}
    # attnlog writes its own event file next to TensorBoardCallback's, and only one
    assert len(ours) == 1 and len(files) == 2, list(files)
    [acc] = ours.values()
    steps = [0, N, 2 * N, LAST]
    for tag in ("patterns/cls/layer_0", "patterns/cls/layer_5", "patterns/prev_token/max"):
        values = acc.Scalars(tag)
        assert [e.step for e in values] == steps, tag
        assert all(0.0 <= e.value <= 1.0 for e in values)
    for tag in (f"attention/{NAMES[0]}/layer_0", f"attention/{NAMES[1]}/model", "patterns/cls"):
        assert [e.step for e in acc.Images(tag)] == steps, tag
    [trainer_file] = set(files) - set(ours)  # the Trainer's own logs, in the same run folder
    assert "train/loss" in files[trainer_file].Tags()["scalars"]


def test_mlflow_holds_everything_in_the_trainers_one_run(main_run):
    client, run = only_run(main_run)
    assert "loss" in run.data.metrics  # logged by MLflowCallback: the same run
    steps = [0, N, 2 * N, LAST]
    for key in ("attn.cls.L0", "attn.prev_token.L5", "attn.summary.max_change"):
        assert metric_steps(client, run, key) == steps, key
    assert run.data.params["attnlog.probe.p1_the_cat_sat"] == "The cat sat. ||| It was happy."

    artifacts = set(artifact_paths(client, run, "attention"))
    for step in steps:
        assert f"attention/step_{step:08d}/scores.json" in artifacts
        assert f"attention/step_{step:08d}.html" in artifacts  # one page: every probe
    images = image_steps(artifact_paths(client, run, "images"))
    for key in (f"attention/{NAMES[0]}/model", f"attention/{NAMES[1]}/layer_5"):
        assert images[key] == steps, key
    assert "patterns/cls" not in images  # pattern cards are opt-in; TensorBoard has the matrices


def test_the_archive_indexes_every_logged_step(main_run):
    assert [e["step"] for e in read_index(main_run / "tb")] == [0, N, 2 * N, LAST]


# ---- report_to="none", bit-identical training, log_on_evaluate --------------------------------


@pytest.fixture(scope="module")
def twins(minilm_path, tmp_path_factory):
    """The same seeded run with dropout on, once with the callback and once without."""
    common = dict(max_steps=5, report_to="none", eval_strategy="steps", eval_steps=3)
    logged = tmp_path_factory.mktemp("logged")
    with_logger = train(
        minilm_path, logged, callback=callback(every_n_steps=2, log_on_evaluate=True), **common
    )
    without = train(minilm_path, tmp_path_factory.mktemp("plain"), **common)
    return logged, with_logger, without


def test_training_is_bit_identical_with_and_without_the_callback(twins):
    _, with_logger, without = twins
    assert with_logger.config.hidden_dropout_prob > 0  # dropout draws random numbers
    pretrained = AutoModelForSequenceClassification.from_pretrained(
        with_logger.config._name_or_path, num_labels=2
    )
    trained = dict(with_logger.named_parameters())
    assert not torch.equal(trained["bert.embeddings.word_embeddings.weight"],
                           pretrained.bert.embeddings.word_embeddings.weight)  # fmt: skip
    for name, param in without.named_parameters():
        assert torch.equal(trained[name], param), name


def test_report_to_none_writes_only_the_archive_and_logs_at_evaluations(twins):
    folder, _, _ = twins
    assert not list(folder.rglob("events.out.tfevents*"))
    assert not (folder / "mlflow.db").exists()
    # every 2 steps, the evaluation at step 3, and the last step
    assert [e["step"] for e in read_index(folder / "tb")] == [0, 2, 3, 4, 5]


# ---- resuming from a checkpoint ------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Ends training early at `step`, as an interrupted job does (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def resumed(minilm_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resumed")
    common = dict(max_steps=6, report_to=["mlflow"])
    first = callback(every_n_steps=2)
    train(minilm_path, folder, callback=first, save_strategy="steps", save_steps=2,
          stop=StopAt(4), **common)  # fmt: skip
    _, run = only_run(folder)
    checkpoint = str(folder / "out" / "checkpoint-2")  # steps 3-4 are replayed, step 4 was logged
    train(minilm_path, folder, callback=callback(every_n_steps=2),
          resume=(checkpoint, run.info.run_id), **common)  # fmt: skip
    return folder


def test_resuming_continues_the_step_axis_without_duplicates(resumed):
    client, run = only_run(resumed)  # MLFLOW_RUN_ID: the Trainer and attnlog resume one run
    assert metric_steps(client, run, "attn.cls.L0") == [0, 2, 4, 6]
    assert [e["step"] for e in read_index(resumed / "tb")] == [0, 2, 4, 6]


# ---- no tokenizer, no TENSORBOARD_LOGGING_DIR, a slow sink at the last step ----------------------


class SlowAtStep(Sink):
    """A sink whose `log_scores` waits at `step` until released (a hung MLflow server)."""

    name = "slow"

    def __init__(self, step: int) -> None:
        self.step = step
        self.release = threading.Event()

    def log_scores(self, table, step: int) -> None:
        if step == self.step:
            self.release.wait(30)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "flush did not finish" in record.getMessage():
            slow.release.set()  # the warning came: let the run end


slow = SlowAtStep(2)


@pytest.fixture(scope="module")
def untokenized(minilm_path, tmp_path_factory):
    """Tokenised data and no processing_class; TensorBoardCallback picks its own folder."""
    folder = tmp_path_factory.mktemp("untokenized")
    records = Records()
    logger = logging.getLogger("attnlog")
    logger.addHandler(records)
    try:
        train(minilm_path, folder, tokenizer=False, tb_env=False, max_steps=2,
              report_to=["tensorboard"],
              callback=callback(every_n_steps=1, sinks=["tensorboard", slow], flush_timeout=0.5))  # fmt: skip
    finally:
        logger.removeHandler(records)
    return folder, records.messages


def test_no_tokenizer_loads_the_one_saved_with_the_model(untokenized, minilm_path):
    folder, messages = untokenized
    said = [m for m in messages if "no tokenizer was passed" in m]
    assert len(said) == 1 and minilm_path in said[0] and "folder" in said[0], messages


def test_no_tensorboard_env_still_one_tensorboard_run(untokenized):
    """Pins how the Trainer's TensorBoard folder is found without a public way (see trainer.py)."""
    folder, _ = untokenized
    [run] = [p for p in (folder / "out" / "runs").iterdir() if p.is_dir()]  # <time>_<host>
    files = read_tensorboard(run)
    tags = [set(acc.Tags()["scalars"]) for acc in files.values()]
    assert len(files) == 2 and any("train/loss" in t for t in tags), list(files)
    assert any("patterns/cls/max" in t for t in tags)
    assert [e["step"] for e in read_index(run)] == [0, 1, 2]


def test_a_hung_sink_at_the_last_step_is_named_and_waited_for_no_longer(untokenized):
    _, messages = untokenized
    [warning] = [m for m in messages if "flush did not finish" in m]
    assert "within 0.5 s" in warning
    pending = re.search(r"not written yet: steps \[([\d, ]+)\]", warning)[1]
    assert 2 in {int(s) for s in pending.split(",")}  # the hung step (the one before may wait too)


def test_no_tokenizer_anywhere_fails_naming_the_fix(tmp_path):
    from attnlog.callbacks.trainer import saved_tokenizer

    model = torch.nn.Linear(2, 2)
    model.name_or_path = str(tmp_path)  # a folder without tokenizer files
    with pytest.raises(ValueError, match=r"processing_class=tokenizer.*none found for"):
        saved_tokenizer(model)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"viewz": ("head",)}, TypeError, "unknown option 'viewz'; did you mean 'views'"),
        ({"views": ("head", "heads")}, ValueError, r"unknown views \['heads'\]"),
        ({"patterns": ["cls", "clss"]}, ValueError, r"unknown patterns \['clss'\]"),
        ({"sinks": ["tensorbord"]}, ValueError, "unknown sink 'tensorbord'"),
        ({"sink_options": {"mlfow": {}}}, ValueError, "unknown sink 'mlfow'"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"flush_timeout": 0}, ValueError, "flush_timeout"),
    ],
)
def test_options_are_checked_when_the_callback_is_built(options, error, match):
    with pytest.raises(error, match=match):
        AttentionLoggerCallback(probes=PROBES, **options)


def test_every_logger_option_is_accepted_by_the_callback():
    AttentionLoggerCallback(views="head", patterns=["cls"], layer_images=True, max_length=32,
                            record_qk=False, queue_size=2, sink_options={"mlflow": {}})  # fmt: skip
