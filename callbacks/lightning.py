"""AttentionLoggerCallback for Lightning: the same engine as the Trainer callback.

Logs at step 0 (`on_train_start`), every `every_n_steps` optimizer steps (`trainer.global_step`)
and at the last step; only global rank zero writes. Lightning is an optional extra, imported
only when this module is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as ex:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "attnlog.callbacks.lightning needs Lightning; install it with "
        "`pip install 'attnlog[lightning]'`"
    ) from ex

from attnlog.callbacks.core import CallbackCore

__all__ = ["AttentionLoggerCallback"]


class AttentionLoggerCallback(CallbackCore, Callback):
    """Log attention of probe sentences at step 0, every `every_n_steps`, and at the last step.

    Args:
        probes: sentences, (sentence_a, sentence_b) pairs, a probe file, or None (built-in set).
        every_n_steps: logging interval in optimizer steps (`trainer.global_step`).
        sinks: sink names or Sink instances; None: "tensorboard", plus "mlflow" when the Trainer
            has an MLFlowLogger (its run is joined). The archive is always written.
        logdir: where TensorBoard events and the archive go; None: the Trainer's TensorBoard
            logger folder, else `<default_root_dir>/attnlog`.
        tokenizer: the tokenizer; None takes the LightningModule's `tokenizer` attribute.
        **options: passed to AttentionLogger (patterns, views, layer_images, sink_options, …).

    Raises:
        TypeError, ValueError: an option AttentionLogger would refuse (checked here, before
            the model loads).

    The model is the LightningModule's `model` attribute, or the module itself when it is a
    Hugging Face model.
    """

    def __init__(
        self,
        probes: Any = None,
        every_n_steps: int = 100,
        sinks: Any = None,
        logdir: str | os.PathLike | None = None,
        tokenizer: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(probes, every_n_steps, sinks, logdir, tokenizer, options)

    # -- events ------------------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        tokenizer = self.tokenizer or getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "AttentionLoggerCallback needs a tokenizer: set `self.tokenizer` on the "
                "LightningModule or pass AttentionLoggerCallback(tokenizer=tokenizer)"
            )
        sinks, options = self._sinks(trainer)
        self.start(trainer.global_step, _hf_model(pl_module), tokenizer, sinks=sinks,
                   logdir=self.logdir or _default_logdir(trainer),
                   is_main_process=trainer.is_global_zero, options=options)  # fmt: skip

    def _sinks(self, trainer: Any) -> tuple[Any, dict[str, Any]]:
        """The sinks and logger options: by default TensorBoard, and the MLFlowLogger's run."""
        options = dict(self.options)  # copied: a second fit() builds its logger the same way
        sink_options = {k: dict(v) for k, v in (options.pop("sink_options", None) or {}).items()}
        options["sink_options"] = sink_options
        if self.sinks is not None:
            return self.sinks, options
        sinks = ["tensorboard"]
        mlflow_logger = _find_logger(trainer, "MLFlowLogger")
        if mlflow_logger is not None:
            sinks.append("mlflow")
            mlflow_options = sink_options.setdefault("mlflow", {})
            # MLFlowLogger keeps its URI private; its public `experiment` is the MlflowClient
            # it logs with, whose `tracking_uri` is public.
            client = mlflow_logger.experiment
            mlflow_options.setdefault("tracking_uri", getattr(client, "tracking_uri", None))
            mlflow_options.setdefault("run_id", mlflow_logger.run_id)
        return sinks, options

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.log_due(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.finish(trainer.global_step)  # Lightning never swaps the weights at the end

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()  # write what was queued before the crash


def _hf_model(pl_module: Any) -> Any:
    model = getattr(pl_module, "model", None)
    if model is not None and hasattr(model, "config"):
        return model
    if hasattr(pl_module, "config"):
        return pl_module
    raise TypeError(
        f"{type(pl_module).__name__} has no Hugging Face model: keep it as `self.model` on the "
        "LightningModule so AttentionLoggerCallback can find it"
    )


def _find_logger(trainer: Any, class_name: str) -> Any:
    for logger in getattr(trainer, "loggers", []) or []:
        if type(logger).__name__ == class_name:
            return logger
    return None


def _default_logdir(trainer: Any) -> Path:
    tb_logger = _find_logger(trainer, "TensorBoardLogger")
    if tb_logger is not None:
        return Path(tb_logger.log_dir)
    return Path(trainer.default_root_dir) / "attnlog"
