"""Sinks: where logging events go (TensorBoard, MLflow, the local archive)."""

from attnlog.sinks.base import SINKS, Sink, register_sink, sink_factory

__all__ = ["SINKS", "Sink", "register_sink", "sink_factory"]
