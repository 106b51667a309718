"""W3C trace context over gRPC metadata, for grpc.aio servers and clients.

Server side, :class:`TracingServerInterceptor` wraps each RPC's handler so that a SERVER span
(name = the method, e.g. ``kvmesh.v1.Gateway/Generate``) is started inside the handler's own
task and is current for the handler's whole body, including every step of a server-streaming
handler. Setting a contextvar in ``intercept_service`` itself would not do: it returns before the
handler runs, so the span could not cover it.

Client side, :func:`client_interceptors` start a CLIENT span per call (a child of whatever span is
current where the call is made) and put its ``traceparent``/``tracestate`` into the call's
metadata; :func:`inject_metadata` does the same by hand for calls made without the interceptors.

    client span (caller process) --traceparent--> SERVER span (callee) --> handler's spans
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
TRACE_KEYS = frozenset(PROPAGATOR.fields)  # {"traceparent", "tracestate"}
# Server-side codes that mean the server failed (OpenTelemetry RPC semantic conventions).
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Behavior = Callable[..., Any]


def inject_metadata(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """``traceparent``/``tracestate`` pairs for the current (or given) context's span."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The remote parent carried by gRPC metadata (an empty context when there is none)."""
    carrier = {
        key.lower(): value
        for key, value in (metadata or ())
        if key.lower() in TRACE_KEYS and isinstance(value, str)
    }
    return PROPAGATOR.extract(carrier)


def method_name(method: str | bytes) -> str:
    """``/pkg.Service/Method`` -> ``pkg.Service/Method`` (the span name)."""
    text = method.decode() if isinstance(method, bytes) else method
    return text.lstrip("/")


def rpc_attributes(name: str) -> dict[str, str]:
    """OpenTelemetry RPC attributes of a method called ``pkg.Service/Method``."""
    service, _, method = name.rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


# --- server -------------------------------------------------------------------------------------


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Starts a SERVER span per RPC, parented by the caller's ``traceparent``."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        name = method_name(handler_call_details.method)  # type: ignore[attr-defined]
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        parent = extract_context(metadata)
        return _wrap_handler(handler, lambda inner: self._traced(inner, name, parent))

    def _traced(self, inner: Behavior, name: str, parent: otel_context.Context) -> Behavior:
        """An async behavior running ``inner`` inside a current SERVER span."""
        tracer = self._tracer
        run = _streamed(inner) if inspect.isasyncgenfunction(inner) else inner

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            with tracer.start_as_current_span(
                name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=rpc_attributes(name),
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    result = await run(request, context)
                except BaseException as exc:
                    _end_server_span(span, _server_code(exc, context), exc)
                    raise
                _end_server_span(span, _status_code(context.code()), None)
                return result

        return behavior


def _streamed(inner: Behavior) -> Behavior:
    """An async-generator handler as a coroutine writing each response with ``context.write``.

    The generator then runs, and is closed, inside the coroutine's task: a context attached
    around it (the SERVER span, or spans the handler opens across its yields) is detached in
    the same context it was attached in, even when the RPC is cancelled mid-stream.
    """

    async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        async with aclosing(inner(request, context)) as responses:
            async for response in responses:
                await context.write(response)

    return run


async def _write_stream(responses: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    """Drive an async-generator handler from this task (so its context stays attached)."""
    async with aclosing(responses) as stream:  # type: ignore[type-var]
        async for response in stream:
            await context.write(response)


def _wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler:
    """The same handler with its (async) behavior replaced by ``wrap(behavior)``."""
    factories = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, factory in factories:
        inner = getattr(handler, attr)
        if inner is None:
            continue
        if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
            return handler  # a synchronous handler: left untraced
        return factory(  # type: ignore[operator]
            wrap(inner), handler.request_deserializer, handler.response_serializer
        )
    return handler


def _status_code(raw: Any) -> grpc.StatusCode:
    """Normalise what ``ServicerContext.code()`` returns (None, a StatusCode, or an int)."""
    if isinstance(raw, grpc.StatusCode):
        return raw
    if isinstance(raw, int):
        return next((c for c in grpc.StatusCode if c.value[0] == raw), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK


def _server_code(failure: BaseException, context: Any) -> grpc.StatusCode:
    """The status an RPC ends with when its handler raised ``failure``."""
    if isinstance(failure, grpc.aio.AbortError):
        return _status_code(context.code())
    if isinstance(failure, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # grpc turns an unhandled exception into UNKNOWN


def _end_server_span(
    span: trace.Span, code: grpc.StatusCode, failure: BaseException | None
) -> None:
    """Record the final status (error only for server faults) and an unexpected exception."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code.name))
    if failure is not None and code == grpc.StatusCode.UNKNOWN:
        span.record_exception(failure)


# --- client -------------------------------------------------------------------------------------


def client_interceptors(tracer: trace.Tracer) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)``."""
    return [TracingUnaryUnaryInterceptor(tracer), TracingUnaryStreamInterceptor(tracer)]


def _start_client_span(
    tracer: trace.Tracer, details: grpc.aio.ClientCallDetails
) -> tuple[trace.Span, grpc.aio.ClientCallDetails]:
    """A CLIENT span for the call, and call details whose metadata carry it."""
    name = method_name(details.method)
    span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=rpc_attributes(name))
    headers = inject_metadata(trace.set_span_in_context(span))
    metadata = _merge_metadata(details.metadata, headers)
    return span, details._replace(metadata=metadata)


def _merge_metadata(
    metadata: Sequence[tuple[str, Any]] | None, headers: list[tuple[str, str]]
) -> grpc.aio.Metadata:
    """``metadata`` without any previous trace headers, plus ``headers``."""
    kept = [(k, v) for k, v in (metadata or ()) if k.lower() not in TRACE_KEYS]
    return grpc.aio.Metadata(*kept, *headers)


def _end_client_span(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return (
        grpc.StatusCode.CANCELLED
        if isinstance(exc, asyncio.CancelledError)
        else (grpc.StatusCode.UNKNOWN)
    )


class TracingUnaryUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """CLIENT span around a unary call; the span ends when the response (or error) arrives."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = _start_client_span(self._tracer, client_call_details)
        try:
            call = await continuation(details, request)
            await call  # raises AioRpcError on a non-OK status
        except BaseException as exc:
            _end_client_span(span, _code_of(exc))
            raise
        _end_client_span(span, grpc.StatusCode.OK)
        return call


class TracingUnaryStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """CLIENT span around a server-streaming call; it ends when the stream ends or fails."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        span, details = _start_client_span(self._tracer, client_call_details)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            _end_client_span(span, _code_of(exc))
            raise
        return _traced_responses(call, span)


async def _traced_responses(call: AsyncIterator[Any], span: trace.Span) -> AsyncIterator[Any]:
    """Yield the call's responses; end ``span`` with the final status."""
    code = grpc.StatusCode.CANCELLED  # the consumer stopped early (generator closed)
    try:
        async for response in call:
            yield response
        code = grpc.StatusCode.OK
    except BaseException as exc:
        code = _code_of(exc)
        raise
    finally:
        _end_client_span(span, code)
