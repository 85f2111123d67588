"""The writer: scores, renders and writes logging events to the sinks, away from the training loop.

The training process only measures (the probe pass and one device→host copy) and hands an
`Event` to one of two writers, which do the rest with the same `EventWriter` (the writer scores):

- `ProcessWriter` (the default): a child process, `python -m attnlog.writer`. Scoring,
  rendering, PNG encoding, protobufs, JSON and tracking clients hold the GIL for about a second
  per event; in another process they cannot slow a training loop that is mostly Python
  launching kernels.
- `ThreadWriter`: a thread of the training process, for `Sink` objects that cannot be rebuilt in
  another process, or when the user asks for it (`writer="thread"`).

Modules: `events` (what is done with one event), `outbox` (the training process's queue and the
thread writer), `spill` (events that wait on disk), `process` (the child process and its
restarts), `split` (named sinks in the process, Sink objects on a thread), `plan` (which sink runs
where), `frames` (the pipe codec), `child` (the child's loop), `contain` (error containment,
shared with the logger).
"""

from attnlog.writer.contain import Containment, cause
from attnlog.writer.events import Event, EventWriter, WriterConfig
from attnlog.writer.outbox import ThreadWriter
from attnlog.writer.process import ProcessWriter

__all__ = [
    "Containment",
    "Event",
    "EventWriter",
    "ProcessWriter",
    "ThreadWriter",
    "WriterConfig",
    "cause",
]
