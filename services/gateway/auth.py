"""Client authentication at the gateway: bearer API keys in gRPC metadata.

    authorization: Bearer <key>  ->  SHA-256(key) compared with every configured hash
                                     (hmac.compare_digest, all of them, whatever matched)
                                 ->  the call runs with `caller` set to the key's id
                                 or  UNAUTHENTICATED "missing or invalid API key"

The gateway holds only hashes (hex SHA-256, from a file and/or a list); a key's id in metrics
and logs is the first KEY_ID_CHARS of its hash, never the key. Health checking and reflection
may stay open (`open_services`), so probes and grpcurl's listing need no key. The file is read
again on `reload()` (SIGHUP): a key removed from it is refused from then on.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from kvmesh.shared.telemetry import KvmeshMetrics

log = logging.getLogger(__name__)

KEY_ID_CHARS = 12
DENIED = "missing or invalid API key"  # the one message: nothing about why
# the services that `open_services` names, by their full gRPC names
OPEN_SERVICE_NAMES = {
    "health": (health.SERVICE_NAME,),
    "reflection": (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"),
}
_HASH = re.compile(r"[0-9a-f]{64}")

# the API key id of the call being served ("" when the gateway takes no keys)
caller: contextvars.ContextVar[str] = contextvars.ContextVar("kvmesh_caller", default="")


def key_hash(key: str) -> str:
    """The hex SHA-256 of an API key: what the gateway is configured with."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_hashes(lines: Iterable[str], where: str) -> list[str]:
    """Hex SHA-256 hashes, one per item; blanks and '#' comments skipped."""
    hashes = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not _HASH.fullmatch(line):
            raise ValueError(
                f"{where}, entry {n}: not a hex SHA-256 hash (64 characters); store "
                "`printf %s KEY | sha256sum`, never the key"
            )
        hashes.append(line)
    return hashes


class ApiKeys:
    """The accepted key hashes: the fixed ones plus the file's, read again on reload()."""

    def __init__(self, hashes: Iterable[str] = (), file: Path | None = None) -> None:
        self.fixed = parse_hashes(hashes, "KVMESH_API_KEY_HASHES")
        self.file = file
        self.hashes = self.fixed + self._file_hashes()

    def reload(self) -> bool:
        """Read the file again; on an error the keys in force stay (False, logged)."""
        try:
            self.hashes = self.fixed + self._file_hashes()
        except (OSError, ValueError) as e:
            log.error("API keys not reloaded, the current ones stay in force: %s", e)
            return False
        log.info("API keys reloaded: %d accepted", len(self.hashes))
        return True

    def identify(self, key: str) -> str | None:
        """The id of `key` if it is accepted, else None. The presented key's hash is compared
        with every accepted hash in constant time and without stopping at a match, so the time
        taken says nothing about how much of a hash matched, nor which."""
        presented = key_hash(key).encode()
        found = None
        for accepted in self.hashes:
            if hmac.compare_digest(presented, accepted.encode()):
                found = accepted
        return found[:KEY_ID_CHARS] if found is not None else None

    def _file_hashes(self) -> list[str]:
        if self.file is None:
            return []
        return parse_hashes(self.file.read_text().splitlines(), str(self.file))


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of an `authorization: Bearer <token>` entry; "" without one."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call in only with an accepted API key (services in `open_services` excepted)."""

    def __init__(
        self, keys: ApiKeys, metrics: KvmeshMetrics, open_services: Iterable[str] = ()
    ) -> None:
        self.keys = keys
        self.metrics = metrics
        self.open = tuple(f"/{name}/" for s in open_services for name in OPEN_SERVICE_NAMES[s])

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(self.open):
            return handler
        key_id = self.keys.identify(bearer(details.invocation_metadata))  # type: ignore[attr-defined]
        if key_id is None:
            return _replaced(handler, _deny)
        self.metrics.count_client_request(key_id)
        return _replaced(handler, _as_caller(key_id, _behavior(handler)))


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


def _as_caller(key_id: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    """`inner` run with `caller` set to key_id (the servicer counts the call's tokens by it)."""

    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller.set(key_id)  # this call's task only: each RPC runs in a task of its own
        result = inner(request, context)
        if hasattr(result, "__aiter__"):  # an async-generator behavior: write what it yields
            async for response in result:
                await context.write(response)
            return None
        return await result

    return run


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (
        handler.unary_unary or handler.unary_stream
        or handler.stream_unary or handler.stream_stream
    )  # fmt: skip


def _replaced(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> Any:
    """A handler of the same kind and (de)serializers as `handler` that runs `behavior`."""
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
