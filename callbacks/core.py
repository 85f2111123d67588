"""What the Trainer and Lightning callbacks share: one logger per training run, and when it logs.

The adapters only translate their framework's events into four calls: `start` when training
begins, `log_due` after each optimizer step, `log_last` once training is known to stop (while
the weights are still those of the last step), and `finish` when training ends.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from attnlog.callbacks.options import check_options
from attnlog.logger import AttentionLogger, check_interval

__all__ = ["CallbackCore", "start_line"]

log = logging.getLogger("attnlog")


class CallbackCore:
    """The framework-free half of an AttentionLoggerCallback.

    Args:
        probes: sentences, (sentence_a, sentence_b) pairs, a probe file, or None (built-in set).
        every_n_steps: logging interval in optimizer steps.
        sinks: sink names or Sink instances; None lets the adapter choose.
        logdir: where TensorBoard events and the archive go; None lets the adapter choose.
        tokenizer: the tokenizer; None lets the adapter find one.
        options: passed to AttentionLogger (checked here, before any model exists).
    """

    def __init__(
        self,
        probes: Any,
        every_n_steps: int,
        sinks: Any,
        logdir: str | os.PathLike | None,
        tokenizer: Any,
        options: dict[str, Any],
    ) -> None:
        check_options(options, sinks)
        self.probes = probes
        self.every_n_steps = check_interval(every_n_steps)
        self.sinks = sinks
        self.logdir = logdir
        self.tokenizer = tokenizer
        self.options = options
        self.logger: AttentionLogger | None = None
        self._last: int | None = None  # the step `log_last` handled

    def start(
        self,
        step: int,
        model: Any,
        tokenizer: Any,
        *,
        sinks: Any,
        logdir: str | os.PathLike,
        is_main_process: bool,
        options: dict[str, Any] | None = None,
        note: str = "",
    ) -> None:
        """Begin a training run: a fresh logger bound to this run's model, then step 0 (or, when
        resumed from a checkpoint at `step`, the steps the interrupted run already logged are
        skipped). `note` ends the line that says where attention goes.

        A logger left open by a `train()`/`fit()` that was interrupted (an exception, Ctrl-C, a
        pruned trial) is closed first: it captures the previous model and remembers that run's
        steps, so reusing it would log the wrong weights and skip steps as already logged.
        """
        self.close()
        self._last = None
        options = self.options if options is None else options
        self.logger = AttentionLogger(model, tokenizer, self.probes, sinks=sinks, logdir=logdir,
                                      is_main_process=is_main_process, **options)  # fmt: skip
        if is_main_process:
            archive = options.get("archive", True)
            line = start_line(self.logger.logdir, sinks, self.every_n_steps, archive)
            print(line + note, file=sys.stderr)
        if step > 0:
            self.logger.resume_at(step)
        else:
            self.logger.log(0)

    def log_due(self, step: int) -> None:
        """Log `step` when it is on the interval and not logged yet (gradient accumulation and
        resumed runs see a step twice)."""
        if self.logger is not None and step % self.every_n_steps == 0:
            self.log_once(step)

    def log_once(self, step: int) -> None:
        if self.logger is not None and step not in self.logger.logged_steps:
            self.logger.log(step)

    def log_last(self, step: int, flush_timeout: float | None = None) -> None:
        """Log the last step with its own weights, then (when `flush_timeout` is given) wait
        until it is written: a tracker may end its run before `finish` runs."""
        if self.logger is None or self._last == step:
            return
        self._last = step
        self.log_once(step)
        if flush_timeout is not None:
            self.logger.flush(timeout=flush_timeout)

    def finish(self, step: int, own_weights: bool = True) -> None:
        """End of training: log the last step if nothing did yet and the model still holds that
        step's weights, then close the logger."""
        if own_weights:
            self.log_last(step)
        elif self.logger is not None and step not in self.logger.logged_steps:
            log.warning(
                "attnlog: the last step %d was not logged: the model no longer holds its weights",
                step,
            )
        self.close()

    def close(self) -> None:
        if self.logger is not None:
            logger, self.logger = self.logger, None
            logger.close()


def start_line(
    logdir: str | os.PathLike, sinks: Any, every_n_steps: int, archive: bool = True
) -> str:
    """One line saying where attention goes and how to open it, so that a run whose tracker
    settings chose no sink (transformers' `report_to="none"`) does not log silently."""
    sinks = [sinks] if isinstance(sinks, str) else list(sinks or [])
    names = [item if isinstance(item, str) else type(item).__name__ for item in sinks]
    names = [name for name in names if name != "archive"]
    if archive:
        where = ", ".join(names) + " and the archive" if names else "the archive only"
    else:
        where = ", ".join(names) or "no sink"
    folder = Path(logdir).absolute()
    return (
        f"attnlog: logging attention every {every_n_steps} steps to {where} "
        f"({folder / 'plugins' / 'attnlog'}); open it with `tensorboard --logdir {folder}` "
        f"(Attention tab) or `attnlog report {folder}`"
    )
