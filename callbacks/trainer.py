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

No tokenizer given and none on the Trainer: the one saved with the model (`model.name_or_path`,
a local folder or the Hugging Face cache, never the network) is loaded, and the log says which.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from attnlog.callbacks.options import check_options
from attnlog.logger import AttentionLogger, check_interval

__all__ = ["AttentionLoggerCallback"]

log = logging.getLogger("attnlog")


class AttentionLoggerCallback(TrainerCallback):
    """Log attention of probe sentences at step 0, every `every_n_steps`, and at the last step.

    Args:
        probes: sentences, (sentence_a, sentence_b) pairs, a probe file, or None (built-in set).
        every_n_steps: logging interval in optimizer steps.
        sinks: sink names or Sink instances; None follows `TrainingArguments.report_to`
            (tensorboard and/or mlflow). The archive is always written.
        logdir: where TensorBoard events and the archive go; None: the Trainer's TensorBoard
            folder (or `output_dir/runs/attnlog` when TensorBoard is off).
        tokenizer: the tokenizer; None takes the Trainer's `processing_class`, else the one
            saved with the model (`model.name_or_path`, local folder or cache only).
        log_on_evaluate: also log at each evaluation.
        flush_timeout: seconds the last step waits for queued events to be written (the
            MLflow run ends right after); the steps still unwritten then are named in a warning.
        **options: passed to AttentionLogger (patterns, views, layer_images, sink_options, …).

    Raises:
        TypeError, ValueError: an option AttentionLogger would refuse (checked here, before
            the model loads).
    """

    def __init__(
        self,
        probes: Any = None,
        every_n_steps: int = 100,
        sinks: Any = None,
        logdir: str | os.PathLike | None = None,
        tokenizer: Any = None,
        log_on_evaluate: bool = False,
        flush_timeout: float = 60.0,
        **options: Any,
    ) -> None:
        check_options(options, sinks)
        if not flush_timeout > 0:
            raise ValueError(
                f"flush_timeout must be a positive number of seconds, got {flush_timeout!r}"
            )
        self.probes = probes
        self.every_n_steps = check_interval(every_n_steps)
        self.flush_timeout = flush_timeout
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
            tokenizer = saved_tokenizer(model)
        sinks = self.sinks if self.sinks is not None else _sinks_from_report_to(args.report_to)
        logdir = self.logdir or _tensorboard_dir(args)
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
            # while the run is still open. Bounded: a hung sink must not hold the end of
            # training; the logger says which steps were left unwritten.
            self.logger.flush(timeout=self.flush_timeout)

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


def saved_tokenizer(model: Any) -> Any:
    """The tokenizer saved with `model` (its `name_or_path`): a local folder or the Hugging Face
    cache, never the network. Says which one it loaded.

    Raises:
        ValueError: none was found; the message names the two ways to pass one.
    """
    from transformers import AutoTokenizer

    from attnlog.capturing import unwrap_model

    source = getattr(unwrap_model(model), "name_or_path", None) if model is not None else None
    if source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as ex:  # not a folder, not cached, or no tokenizer files
            cause = f"; none found for {source!r} ({type(ex).__name__})"
        else:
            where = "folder" if Path(source).is_dir() else "Hugging Face cache"
            log.warning(
                "attnlog: no tokenizer was passed; using the one saved with the model "
                "(%s from the %s %s)", type(tokenizer).__name__, where, source,
            )  # fmt: skip
            return tokenizer
    else:
        cause = "; the model has no name_or_path to load one from"
    raise ValueError(
        "AttentionLoggerCallback needs a tokenizer: pass Trainer(processing_class=tokenizer) "
        f"or AttentionLoggerCallback(tokenizer=tokenizer){cause}"
    )


def _tensorboard_dir(args) -> Path:
    """The folder of the Trainer's own TensorBoard events, so TensorBoard shows one run.

    transformers gives a callback no public way to reach another callback (callbacks get neither
    the Trainer nor its CallbackHandler), and since 5.x TensorBoardCallback picks its folder
    (`output_dir/runs/<time>_<host>`) in its own `on_train_begin`, which runs just before ours.
    So we look for the event file that this process opened there: TensorBoard names event files
    `events.out.tfevents.<time>.<host>.<pid>.<n>`. Pinned by test_trainer_callback.py's
    `test_no_tokenizer_and_no_tensorboard_env`.
    """
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")  # transformers 5.x reads it
    if env:
        return Path(os.path.expanduser(env))
    logging_dir = getattr(args, "logging_dir", None)  # transformers 4.x: TensorBoardCallback's
    roots = [Path(logging_dir)] if logging_dir else []
    roots.append(Path(args.output_dir) / "runs")
    opened = _newest_event_file_of_this_process(roots)
    if opened is not None:
        return opened.parent
    if logging_dir:
        return Path(os.path.expanduser(logging_dir))
    return Path(args.output_dir) / "runs" / "attnlog"


def _newest_event_file_of_this_process(roots: list[Path]) -> Path | None:
    mine = f".{os.getpid()}."
    found = [
        path
        for root in roots
        if root.is_dir()
        for pattern in ("events.out.tfevents.*", "*/events.out.tfevents.*",
                        "*/*/events.out.tfevents.*")  # a hyper-parameter search's trial folders
        for path in root.glob(pattern)
        if mine in path.name
    ]  # fmt: skip
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
