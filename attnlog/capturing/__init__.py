"""Run the probes through the live model and reduce its attention layer by layer.

The modules, along the seams of a probe pass:

- `attention`: attnlog's attention function (registered with transformers'
  `AttentionInterface`) and `probe_pass`, which switches the model to it and restores
  everything afterwards;
- `stream` and `pooling`: each layer reduced as the model computes it, whole or pooled;
- `batches`: probe batches as model inputs, and the `output_attentions` path for models that
  cannot stream;
- `distributed`: ranks agreeing on a pass under sharded training;
- `options`: the capture options, checked in one place;
- `capturer`: `Capturer` (one pass per logging event) and `capture` (one shot).

What is kept: attention whole up to `full_attention_limit` tokens (with query/key vectors for
the neuron view), pooled by blocks beyond. Scores: the writer scores probes kept whole; pooled
probes are scored in the pass, where their whole attention exists.
"""

from __future__ import annotations

from attnlog.capturing.attention import probe_pass
from attnlog.capturing.capturer import Capturer, capture
from attnlog.capturing.distributed import broadcast_from_rank_zero
from attnlog.capturing.models import AttentionUnavailableError, is_sharded, unwrap_model
from attnlog.capturing.options import CaptureOptions
from attnlog.capturing.pooling import pool_attention, span_labels
from attnlog.capturing.stream import CHUNK_BYTES

__all__ = [
    "CHUNK_BYTES",
    "AttentionUnavailableError",
    "CaptureOptions",
    "Capturer",
    "broadcast_from_rank_zero",
    "capture",
    "is_sharded",
    "pool_attention",
    "probe_pass",
    "span_labels",
    "unwrap_model",
]
