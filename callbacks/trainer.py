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
a local folder or the Hugging Face cache, never the network) is loaded, and the log says which;
with none there either, building the Trainer fails (`on_init_end`), before MLflow starts a run.

`Trainer.hyperparameter_search`: every trial logs to a folder of its own below the first
trial's (`trial_<k>`), so trials never overwrite each other's archive and each is its own
TensorBoard run; its MLflow events go to the run that holds that trial's metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from attnlog.callbacks.core import CallbackCore

__all__ = ["AttentionLoggerCallback"]

log = logging.getLogger("attnlog")

NO_TRACKER = (
    '; report_to chose no tracker: add TrainingArguments(report_to=["tensorboard", '
    '"mlflow"]) or AttentionLoggerCallback(sinks=[...]) to log there too'
)


class AttentionLoggerCallback(CallbackCore, TrainerCallback):
    """Log attention of probe sentences at step 0, every `every_n_steps`, and at the last step.

    The last step is logged as soon as training is known to stop (the step limit, or a callback
    such as `EarlyStoppingCallback` setting `should_training_stop`), before
    `load_best_model_at_end` reloads the best checkpoint: every logged step holds that step's
    own weights. The reloaded model is not logged again; its step was logged if it was on the
    interval.

    Args:
        probes: sentences, (sentence_a, sentence_b) pairs, a probe file, or None (built-in set).
        every_n_steps: logging interval in optimizer steps.
        sinks: sink names or Sink instances; None follows `TrainingArguments.report_to`
            (tensorboard and/or mlflow). The archive is always written.
        logdir: where TensorBoard events and the archive go; None: the Trainer's TensorBoard
            folder (or `output_dir/runs/attnlog` when TensorBoard is off). In a hyper-parameter
            search each trial gets a folder of its own below it.
        tokenizer: the tokenizer; None takes the Trainer's `processing_class`, else the one
            saved with the model (`model.name_or_path`, local folder or cache only).
        log_on_evaluate: also log at each evaluation.
        flush_timeout: seconds the last step waits for queued events to be written (the
            MLflow run ends right after); the steps still unwritten then are named in a warning.
        **options: passed to AttentionLogger (patterns, views, layer_images, sink_options, …).

    Raises:
        TypeError, ValueError: an option AttentionLogger would refuse (checked here, before
            the model loads); no tokenizer to be found (checked when the Trainer is built).
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
        super().__init__(probes, every_n_steps, sinks, logdir, tokenizer, options)
        if not flush_timeout > 0:
            raise ValueError(
                f"flush_timeout must be a positive number of seconds, got {flush_timeout!r}"
            )
        self.flush_timeout = flush_timeout
        self.log_on_evaluate = log_on_evaluate
        self._saved_tokenizer: Any = None  # found when the Trainer was built
        self._trials = TrialFolders()

    # -- set-up ------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Find the tokenizer when the Trainer is built: without one, fail before any tracker
        (MLflow's run) or the training data is touched."""
        self._saved_tokenizer = None
        self._trials = TrialFolders()  # a new Trainer: its search, its folders
        given = self.tokenizer or processing_class or kwargs.get("tokenizer")  # transformers 4
        if given is None and model is not None:
            self._saved_tokenizer = saved_tokenizer(model)
        from attnlog.writer.plan import choose_writer

        writer = choose_writer(self.options.get("writer", "auto"), model)
        if state.is_world_process_zero and writer == "process":
            # The writer process starts now and imports what it needs while the Trainer sets up
            # (not for the thread writer, which `auto` picks when CPU training fills every core).
            from attnlog.writer.process import prestart

            sinks = self._sinks(args)
            sinks = [sinks] if isinstance(sinks, str) else sinks
            prestart([name for name in sinks if isinstance(name, str)])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tokenizer = (self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
                     or self._saved_tokenizer)  # fmt: skip
        if tokenizer is None:
            tokenizer = saved_tokenizer(model)
        sinks = self._sinks(args)
        logdir = self._trials.folder(self.logdir or _tensorboard_dir(args), state)
        if state.is_hyper_param_search and "mlflow" in sinks and state.is_world_process_zero:
            _start_trial_run(args)
        note = NO_TRACKER if self.sinks is None and not sinks else ""
        self.start(state.global_step, model, tokenizer, sinks=sinks, logdir=logdir,
                   is_main_process=state.is_world_process_zero, note=note)  # fmt: skip

    def _sinks(self, args) -> Any:
        """The sinks given, else those `report_to` names."""
        return self.sinks if self.sinks is not None else _sinks_from_report_to(args.report_to)

    # -- events ------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        self.log_due(state.global_step)
        self._log_if_stopping(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.log_on_evaluate:
            self.log_once(state.global_step)
        self._log_if_stopping(state, control)

    # Training is stopped by a callback's on_step_end or on_evaluate (EarlyStoppingCallback),
    # which may come after ours; on_save, on_epoch_end and on_log (the Trainer logs its train
    # metrics) still come before `load_best_model_at_end` replaces the weights.
    def on_save(self, args, state, control, **kwargs):
        self._log_if_stopping(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log_if_stopping(state, control)

    def on_log(self, args, state, control, **kwargs):
        self._log_if_stopping(state, control)

    def _log_if_stopping(self, state, control) -> None:
        if control.should_training_stop or state.global_step >= state.max_steps:
            # MLflowCallback ends its run in on_train_end, before ours runs: write everything
            # while the run is still open. Bounded: a hung sink must not hold the end of
            # training; the logger says which steps were left unwritten.
            self.log_last(state.global_step, self.flush_timeout)

    def on_train_end(self, args, state, control, **kwargs):
        reloaded = args.load_best_model_at_end and state.best_model_checkpoint is not None
        if reloaded and self.logger is not None:
            best = getattr(state, "best_global_step", None)  # not in older transformers 4
            logged = best in self.logger.logged_steps
            log.info(
                "attnlog: the Trainer reloaded the best checkpoint (%s); its attention %s",
                state.best_model_checkpoint,
                f"is the one logged at step {best}" if logged else "was not logged",
            )
        self.finish(state.global_step, own_weights=not reloaded)


def _start_trial_run(args) -> None:
    """Give a hyper-parameter search's trial the MLflow run that its metrics will go to.

    transformers' MLflowCallback starts a run for the first trial only; a later trial's metrics
    go to the run MLflow starts at their first `log`, after our logger has chosen its run. When
    the Trainer logs to MLflow and no run is active, start that run now (as MLflowCallback
    would, by name): the Trainer then logs into it and ends it with the trial, and the trial's
    attention sits beside its metrics.
    """
    if "mlflow" not in _sinks_from_report_to(args.report_to):
        return
    import mlflow

    if mlflow.active_run() is None:
        mlflow.start_run(run_name=args.run_name)


class TrialFolders:
    """A folder of its own for each trial of a hyper-parameter search, below the first trial's
    folder, so that trials never overwrite each other's archive and each is its own TensorBoard
    run. Named after the search's `hp_name` when it has one, else `trial_<k>`, the first free k.
    """

    def __init__(self) -> None:
        self.root: Path | None = None  # found at the first trial, kept for the others

    def folder(self, base: str | os.PathLike, state) -> Path:
        if not state.is_hyper_param_search:
            return Path(base)
        if self.root is None:
            self.root = Path(base)
        name = state.trial_name
        if not state.is_world_process_zero:  # writes nothing: no folder to claim
            return self.root / (name or "trial")
        candidate, k = name or "trial_0", 0
        while True:  # claimed now: the previous trial's writer may not have made its folder yet
            try:
                (self.root / candidate).mkdir(parents=True)
                return self.root / candidate
            except FileExistsError:
                k += 1
                candidate = f"{name or 'trial'}_{k}"


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
