"""The Lightning callback with a real `lightning.Trainer` fine-tuning the shipped MiniLM."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")
pytest.importorskip("tensorboard")

import torch  # noqa: E402
from lightning import LightningModule, Trainer  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from attnlog.callbacks.lightning import AttentionLoggerCallback  # noqa: E402
from attnlog.layout import read_index  # noqa: E402
from attnlog.probes import Probe  # noqa: E402

PAIRS = [
    ("The cat sat on the mat.", "The cat was happy.", 1),
    ("A dog ran in the park.", "The train was late.", 0),
    ("My teacher found a letter.", "Nobody read the letter.", 1),
    ("The river was cold.", "A bird sang loudly.", 0),
]


class PairClassifier(LightningModule):
    """The usual layout: a Hugging Face model as `self.model`, its tokenizer as `self.tokenizer`."""

    def __init__(self, path: str, expose_tokenizer: bool = True) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.text_tokenizer = AutoTokenizer.from_pretrained(path)
        if expose_tokenizer:
            self.tokenizer = self.text_tokenizer
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.model.train()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def train_dataloader(self):
        a, b, labels = zip(*PAIRS)
        enc = self.text_tokenizer(list(a), list(b), padding=True, return_tensors="pt")
        rows = [{k: v[i] for k, v in enc.items()} | {"labels": labels[i]} for i in range(len(a))]
        return torch.utils.data.DataLoader(rows, batch_size=2, shuffle=False)


def _fit(tmp_path, minilm_path, **options) -> AttentionLoggerCallback:
    callback = AttentionLoggerCallback(
        probes=[Probe("The cat sat on the mat.", "The cat was happy.", name="cat")],
        every_n_steps=3,
        sinks=["tensorboard"],
        logdir=tmp_path / "logs",
        views=("head",),
        layer_images=True,
        **options,
    )
    trainer = Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(PairClassifier(minilm_path))
    return callback


@pytest.mark.slow
def test_lightning_logs_first_every_n_and_last_step(tmp_path, minilm_path):
    callback = _fit(tmp_path, minilm_path)
    logdir = tmp_path / "logs"

    assert [e["step"] for e in read_index(logdir)] == [0, 3, 4]  # step 0, every 3, the last
    assert callback.logger is None  # closed at the end of training

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images, scalars = set(acc.Tags()["images"]), set(acc.Tags()["scalars"])
    for tag in ("attention/cat/model", "attention/cat/layer_0", "patterns/delimiter"):
        assert tag in images
        assert [e.step for e in acc.Images(tag)] == [0, 3, 4]
    assert {"patterns/delimiter/layer_0", "patterns/delimiter/max"} <= scalars
    assert (logdir / "plugins/attnlog/html/attention/step_00000004.html").is_file()


def test_missing_tokenizer_fails_before_training(tmp_path, minilm_path):
    callback = AttentionLoggerCallback(every_n_steps=2, sinks=[], logdir=tmp_path)
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        trainer.fit(PairClassifier(minilm_path, expose_tokenizer=False))


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionLoggerCallback(every_n_steps=0)


def test_options_are_checked_when_the_callback_is_built():
    with pytest.raises(TypeError, match="unknown option 'viewz'; did you mean 'views'"):
        AttentionLoggerCallback(viewz=("head",))


@pytest.mark.slow
def test_mlflow_logger_run_is_joined_through_its_public_client(tmp_path, minilm_path):
    """No private `_tracking_uri`: the URI comes from MLFlowLogger.experiment (an MlflowClient)."""
    mlflow = pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(experiment_name="lightning", tracking_uri=uri,
                                 artifact_location=str(tmp_path / "artifacts"))  # fmt: skip
    callback = AttentionLoggerCallback(
        probes=["The cat sat on the mat."], every_n_steps=2, logdir=tmp_path / "logs",
        views=("head",), patterns=["cls"],
    )  # fmt: skip
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=mlflow_logger,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])  # fmt: skip
    try:
        trainer.fit(PairClassifier(minilm_path))
    finally:
        # MLFlowLogger calls mlflow.set_tracking_uri, which outlives this test (and sets
        # MLFLOW_TRACKING_URI): later Trainer runs would log into this test's store.
        mlflow.set_tracking_uri(None)

    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == mlflow_logger.run_id  # one run: the logger's
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "attn.cls.L0"))
    assert steps == [0, 2]


class Crashes(PairClassifier):
    """Fails in the middle of training, as an interrupted fit does."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, minilm_path):
    """A two-layer random BERT saved with the MiniLM tokenizer: a Lightning fit in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_callback_reused_after_a_crash_logs_the_next_fit_and_says_where(
    tmp_path, tiny_path, capsys
):
    callback = AttentionLoggerCallback(probes=["The cat sat on the mat."], every_n_steps=2,
                                       sinks=[], views=(), patterns=["cls"])  # fmt: skip

    def fit(name: str, module: type[PairClassifier]) -> None:
        trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path / name, callbacks=[callback])  # fmt: skip
        trainer.fit(module(tiny_path))

    with pytest.raises(RuntimeError, match="boom"):
        fit("first", Crashes)
    fit("second", PairClassifier)
    runs = [tmp_path / "first" / "attnlog", tmp_path / "second" / "attnlog"]
    assert [e["step"] for e in read_index(runs[0])] == [0, 2]  # written when the crash came
    assert [e["step"] for e in read_index(runs[1])] == [0, 2, 4]
    said = [line for line in capsys.readouterr().err.splitlines() if "attnlog: logging" in line]
    assert len(said) == 2
    for line, logdir in zip(said, runs):
        assert "every 2 steps to the archive only" in line
        assert f"`tensorboard --logdir {logdir.absolute()}`" in line
