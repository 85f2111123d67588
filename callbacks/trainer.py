"""AttentionLoggerCallback: the Hugging Face Trainer adapter around AttentionLogger.

It joins what the Trainer already does rather than inventing parallel conventions: sinks follow
`TrainingArguments.report_to`, TensorBoard events go to the folder of the Trainer's own
TensorBoardCallback (`TENSORBOARD_LOGGING_DIR`, or `output_dir/runs/...`), and MLflow joins the
run MLflowCallback started (or the active run, or `MLFLOW_RUN_ID`) — one run, never two.

TensorBoard: attnlog writes its own event file in that folder instead of sharing the
TensorBoardCallback's `SummaryWriter`. The worker writes after the training thread has moved on,
and TensorBoardCallback closes its writer in its `on_train_end`, which runs before ours (user
callbacks come after the built-in ones); a closed `SummaryWriter` silently reopens a new event
file that nobody closes. TensorBoard merges all event files of a folder into one run, so users
still see one run, and the two writers' lifetimes no longer depend on callback order, early
stopping or evaluation after the last step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from attnlog.logger import AttentionLogger, check_interval


class AttentionLoggerCallback(TrainerCallback):
    """Log attention of probe sentences at step 0, every `every_n_steps`, and at the last step.

    Args:
        probes: sentences, (sentence_a, sentence_b) pairs, a probe file, or None (built-in set).
        every_n_steps: logging interval in optimizer steps.
        sinks: sink names or Sink instances; None follows `TrainingArguments.report_to`
            (tensorboard and/or mlflow). The archive is always written.
        logdir: where TensorBoard events and the archive go; None: the Trainer's TensorBoard
            folder (or `output_dir/runs/attnlog` when TensorBoard is off).
        tokenizer: the tokenizer; None takes the Trainer's `processing_class`.
        log_on_evaluate: also log at each evaluation.
        **options: passed to AttentionLogger (patterns, views, layer_images, sink_options, …).
    """

    def __init__(
        self,
        probes: Any = None,
        every_n_steps: int = 100,
        sinks: Any = None,
        logdir: str | os.PathLike | None = None,
        tokenizer: Any = None,
        log_on_evaluate: bool = False,
        **options: Any,
    ) -> None:
        self.probes = probes
        self.every_n_steps = check_interval(every_n_steps)
        self.sinks = sinks
        self.logdir = logdir
        self.tokenizer = tokenizer
        self.log_on_evaluate = log_on_evaluate
        self.options = options
        self.logger: AttentionLogger | None = None

    # -- set-up ------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.logger is None:
            self.logger = self._make_logger(args, state, model, kwargs)
        if state.global_step > 0:  # resumed from a checkpoint: its first step was logged
            self.logger.resume_at(state.global_step)
        else:
            self.logger.log(0)

    def _make_logger(self, args, state, model, kwargs) -> AttentionLogger:
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tokenizer is None:
            raise ValueError(
                "AttentionLoggerCallback needs a tokenizer: pass Trainer(processing_class=tokenizer) "
                "or AttentionLoggerCallback(tokenizer=tokenizer)"
            )
        tb_callback = _trainer_callback("TensorBoardCallback")
        sinks = self.sinks if self.sinks is not None else _sinks_from_report_to(args.report_to)
        logdir = self.logdir or _tensorboard_dir(args, tb_callback)
        return AttentionLogger(
            model,
            tokenizer,
            self.probes,
            sinks=sinks,
            logdir=logdir,
            is_main_process=state.is_world_process_zero,
            **self.options,
        )

    # -- events ------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.logger is None:
            return
        if (step % self.every_n_steps == 0 or step == state.max_steps) and self._fresh(step):
            self.logger.log(step)
        if step == state.max_steps:
            # MLflowCallback ends its run in on_train_end, before ours runs: write everything
            # while the run is still open (training is over; nothing waits on this but the end).
            self.logger.flush()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.log_on_evaluate and self.logger is not None and self._fresh(state.global_step):
            self.logger.log(state.global_step)

    def _fresh(self, step: int) -> bool:
        """Not logged yet, in this run or by the interrupted run this one resumes."""
        return step not in self.logger.logged_steps

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is None:
            return
        if self._fresh(state.global_step):
            self.logger.log(state.global_step)
        self.logger.close()
        self.logger = None


def _sinks_from_report_to(report_to: Any) -> list[str]:
    if report_to is None or report_to == "none":
        return []
    if isinstance(report_to, str):
        report_to = [report_to]
    wanted = set(report_to)
    if "all" in wanted:
        wanted = {"tensorboard", "mlflow"}
    return [name for name in ("tensorboard", "mlflow") if name in wanted]


def _tensorboard_dir(args, tb_callback) -> Path:
    for candidate in (
        getattr(tb_callback, "logging_dir", None),
        os.environ.get("TENSORBOARD_LOGGING_DIR"),
        getattr(args, "logging_dir", None),  # transformers 4.x
    ):
        if candidate:
            return Path(os.path.expanduser(candidate))
    return Path(args.output_dir) / "runs" / "attnlog"


def _trainer_callback(name: str) -> Any:
    """The Trainer's own callback of that class, found on the calling CallbackHandler.

    Callbacks are not given the Trainer; the handler that is calling us is on the stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        handler = frame.f_locals.get("self")
        if type(handler).__name__ == "CallbackHandler":
            for callback in getattr(handler, "callbacks", []):
                if type(callback).__name__ == name:
                    return callback
            return None
        frame = frame.f_back
    return None
