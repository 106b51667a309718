"""Log records that carry the trace and span ids of the span current when they were logged."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from opentelemetry import trace

LOG_FORMAT = (
    "%(asctime)s %(levelname)s %(service_name)s %(name)s: %(message)s "
    "trace_id=%(trace_id)s span_id=%(span_id)s"
)
NO_TRACE_ID = "0" * 32
NO_SPAN_ID = "0" * 16


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` (32 hex), ``span_id`` (16 hex) and ``service_name`` to each record.

    Ids are all zeros outside a span. Attach it to a handler (not a logger) so that records of
    every logger reaching the handler get the fields.
    """

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        valid = span_context.is_valid
        record.trace_id = format(span_context.trace_id, "032x") if valid else NO_TRACE_ID
        record.span_id = format(span_context.span_id, "016x") if valid else NO_SPAN_ID
        record.service_name = self.service_name
        return True


def configure_logging(
    service_name: str, level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) from the root logger with trace ids; replaces an earlier call's
    handler, so calling it twice does not duplicate lines. Returns the installed handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(TraceContextFilter(service_name))
    handler.set_name("kvmesh-telemetry")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "kvmesh-telemetry"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
