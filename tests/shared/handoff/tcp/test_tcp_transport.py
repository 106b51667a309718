"""The TCP KV transport over real loopback sockets: delivery, rejection, corruption, failures."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvmesh.shared.handoff.tcp.frames import HEADER, Header, TcpFrameKind, read_header, read_message
from kvmesh.shared.handoff.tcp.receiver import SocketKVReceiver
from kvmesh.shared.handoff.tcp.sender import SocketKVSender
from kvmesh.shared.handoff.transport import HandoffError, HandoffResult
from kvmesh.shared.handoff.wire import format_endpoint, parse_endpoint

SHAPE = (2, 3, 16, 2, 8)  # [2 (k, v), n_blocks, block_size, kv_heads, head_dim]


@pytest.fixture
def receiver() -> Iterator[SocketKVReceiver]:
    rx = SocketKVReceiver()
    rx.start()
    yield rx
    rx.close()


@pytest.fixture
def sender() -> Iterator[SocketKVSender]:
    tx = SocketKVSender()
    yield tx
    tx.close()


def endpoint(rx: SocketKVReceiver) -> str:
    return format_endpoint(rx.advertise_host, rx.port)


def new_id() -> str:
    return str(uuid.uuid4())


def kv_layers(
    num_layers: int, dtype: torch.dtype, shape: tuple[int, ...] = SHAPE
) -> list[torch.Tensor]:
    return [torch.randn(shape).to(dtype) for _ in range(num_layers)]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Cache:
    """A decode-side destination: on_layer copies each layer out of the staging buffer."""

    def __init__(self, like: list[torch.Tensor]) -> None:
        self.layers = [torch.zeros_like(t) for t in like]
        self.calls: list[int] = []

    def on_layer(self, layer: int, staging: torch.Tensor) -> None:
        dst = self.layers[layer]
        dst.copy_(staging.view(dst.dtype).view(dst.shape))
        self.calls.append(layer)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def test_bit_identical_delivery_of_concurrent_handoffs(
    receiver: SocketKVReceiver, sender: SocketKVSender
) -> None:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] * 2
    sources = [kv_layers(4, dtype) for dtype in dtypes]
    caches = [Cache(src) for src in sources]
    ids = [new_id() for _ in sources]
    futures = [
        receiver.expect(h, 4, nbytes(src[0]), cache.on_layer)
        for h, src, cache in zip(ids, sources, caches, strict=True)
    ]
    channels = [sender.open(endpoint(receiver), h, 4) for h in ids]
    assert all(ch.conn is channels[0].conn for ch in channels)  # one pooled connection
    for layer in range(4):  # interleave the handoffs frame by frame
        for ch, src in zip(channels, sources, strict=True):
            ch.send_layer(layer, src[layer])
    stats = [ch.finish(timeout=10) for ch in channels]
    for src, cache, future, st in zip(sources, caches, futures, stats, strict=True):
        result = future.result(timeout=1)
        assert result.ok and result.error == ""
        assert result.nbytes == st.nbytes == 4 * nbytes(src[0])
        assert len(st.layer_seconds) == 4 and st.gbps > 0
        assert sorted(cache.calls) == [0, 1, 2, 3]
        for sent, got in zip(src, cache.layers, strict=True):
            assert torch.equal(bits(sent), bits(got))


def test_concurrent_handoffs_from_threads(
    receiver: SocketKVReceiver, sender: SocketKVSender
) -> None:
    def one_handoff(seed: int) -> bool:
        torch.manual_seed(seed)
        src = kv_layers(3, torch.bfloat16, shape=(2, 5, 16, 4, 32))
        cache, h = Cache(src), new_id()
        future = receiver.expect(h, 3, nbytes(src[0]), cache.on_layer)
        channel = sender.open(endpoint(receiver), h, 3)
        for layer, data in enumerate(src):
            channel.send_layer(layer, data)
        channel.finish(timeout=10)
        assert future.result(timeout=1).ok
        return all(torch.equal(bits(a), bits(b)) for a, b in zip(src, cache.layers, strict=True))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one_handoff, range(16)))


def test_throughput_is_reported(receiver: SocketKVReceiver, sender: SocketKVSender) -> None:
    src = kv_layers(8, torch.bfloat16, shape=(2, 64, 16, 8, 64))  # 2 MiB per layer
    cache, h = Cache(src), new_id()
    future = receiver.expect(h, 8, nbytes(src[0]), cache.on_layer)
    channel = sender.open(endpoint(receiver), h, 8)
    for layer, data in enumerate(src):
        channel.send_layer(layer, data)
    stats = channel.finish(timeout=30)
    assert future.result(timeout=1).ok and stats.nbytes == 8 * nbytes(src[0])
    print(
        f"\nloopback handoff: {stats.nbytes / 2**20:.0f} MiB in {stats.seconds * 1e3:.1f} ms, "
        f"{stats.gbps:.2f} GB/s"
    )


def test_unknown_handoff_is_rejected_and_the_connection_survives(
    receiver: SocketKVReceiver, sender: SocketKVSender
) -> None:
    src = kv_layers(2, torch.float16)
    bystander = Cache(src)
    expected = new_id()
    future = receiver.expect(expected, 2, nbytes(src[0]), bystander.on_layer)
    stranger = sender.open(endpoint(receiver), new_id(), 2)
    for layer, data in enumerate(src):
        stranger.send_layer(layer, data)
    with pytest.raises(HandoffError, match="not expected"):
        stranger.finish(timeout=10)
    assert bystander.calls == [] and not future.done()
    channel = sender.open(endpoint(receiver), expected, 2)
    assert channel.conn is stranger.conn
    for layer, data in enumerate(src):
        channel.send_layer(layer, data)
    channel.finish(timeout=10)
    assert future.result(timeout=1).ok and bystander.calls == [0, 1]


class CorruptingProxy:
    """A TCP relay that flips one byte at `offset` of the sender -> receiver stream."""

    def __init__(self, upstream: str, offset: int) -> None:
        self.upstream, self.offset = parse_endpoint(upstream), offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = format_endpoint("127.0.0.1", self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            down, _ = self.listener.accept()
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while chunk := bytearray(src.recv(65536)):
                if corrupt and seen <= self.offset < seen + len(chunk):
                    chunk[self.offset - seen] ^= 0x01
                seen += len(chunk)
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_corruption_on_the_wire_is_detected(
    receiver: SocketKVReceiver, sender: SocketKVSender
) -> None:
    src = kv_layers(3, torch.float32)
    cache, h = Cache(src), new_id()
    future = receiver.expect(h, 3, nbytes(src[0]), cache.on_layer)
    proxy = CorruptingProxy(endpoint(receiver), offset=HEADER.size + 100)  # layer 0's payload
    try:
        channel = sender.open(proxy.endpoint, h, 3)
        for layer, data in enumerate(src):
            channel.send_layer(layer, data)
        with pytest.raises(HandoffError, match="checksum mismatch on layer 0"):
            channel.finish(timeout=10)
    finally:
        proxy.close()
    result = future.result(timeout=1)
    assert not result.ok and "checksum" in result.error
    assert cache.calls == []  # nothing of it was ever handed to the cache


def _raw_frame(rx: SocketKVReceiver, header: Header, payload: bytes) -> tuple[Header, str]:
    """Write one frame with a raw socket; return the receiver's reply."""
    with socket.create_connection(("127.0.0.1", rx.port)) as raw:
        raw.sendall(header.pack() + payload)
        reply = read_header(raw)
        assert reply is not None
        return reply, read_message(raw, reply)


@pytest.mark.parametrize(
    ("crc", "size", "error"), [(12345, 1024, "checksum"), (0, 10, "bytes != expected")]
)
def test_raw_writer_bad_crc_and_bad_size_get_nack(
    receiver: SocketKVReceiver, crc: int, size: int, error: str
) -> None:
    payload = bytes(range(256)) * 4  # the receiver expects 1024-byte layers
    cache, h = Cache([torch.zeros(1024, dtype=torch.uint8)] * 2), new_id()
    future = receiver.expect(h, 2, len(payload), cache.on_layer)
    header = Header(TcpFrameKind.DATA, uuid.UUID(h).bytes, 0, 2, size, crc)
    reply, message = _raw_frame(receiver, header, payload[:size])
    assert reply.kind == TcpFrameKind.NACK and reply.handoff_id == uuid.UUID(h).bytes
    assert error in message
    result = future.result(timeout=1)
    assert not result.ok and error in result.error and cache.calls == []


def test_receiver_closed_mid_transfer_fails_the_sender_quickly(sender: SocketKVSender) -> None:
    rx = SocketKVReceiver()
    rx.start()
    src = kv_layers(4, torch.float16)
    cache, h = Cache(src), new_id()
    future = rx.expect(h, 4, nbytes(src[0]), cache.on_layer)
    channel = sender.open(endpoint(rx), h, 4)
    channel.send_layer(0, src[0])
    channel.send_layer(1, src[1])
    _wait_for(lambda: len(cache.calls) == 2)
    rx.close()
    assert future.result(timeout=1) == HandoffResult(
        ok=False,
        nbytes=2 * nbytes(src[0]),
        seconds=future.result().seconds,
        error="receiver closed",
    )
    start = time.monotonic()
    with pytest.raises(HandoffError, match="lost"):
        channel.send_layer(2, src[2])
        channel.send_layer(3, src[3])
        channel.finish(timeout=30)
    assert time.monotonic() - start < 5  # well before the 30 s timeout


def test_sender_death_fails_the_receiver(receiver: SocketKVReceiver) -> None:
    src = kv_layers(2, torch.float32)
    cache, h = Cache(src), new_id()
    future = receiver.expect(h, 2, nbytes(src[0]), cache.on_layer)
    tx = SocketKVSender()
    tx.open(endpoint(receiver), h, 2).send_layer(0, src[0])
    _wait_for(lambda: cache.calls == [0])
    tx.close()
    result = future.result(timeout=5)
    assert not result.ok and "sender disconnected" in result.error


def test_cancel_stops_delivery(receiver: SocketKVReceiver, sender: SocketKVSender) -> None:
    src = kv_layers(3, torch.bfloat16)
    cache, h = Cache(src), new_id()
    future = receiver.expect(h, 3, nbytes(src[0]), cache.on_layer)
    channel = sender.open(endpoint(receiver), h, 3)
    channel.send_layer(0, src[0])
    _wait_for(lambda: cache.calls == [0])
    receiver.cancel(h)
    assert future.result(timeout=1).error == "cancelled"
    channel.send_layer(1, src[1])
    channel.send_layer(2, src[2])
    with pytest.raises(HandoffError, match="not expected"):
        channel.finish(timeout=10)
    assert cache.calls == [0]
    receiver.cancel(h)  # idempotent


def test_sender_abort_and_timeouts_never_hang(
    receiver: SocketKVReceiver, sender: SocketKVSender
) -> None:
    src = kv_layers(2, torch.float32)
    h = new_id()
    future = receiver.expect(h, 2, nbytes(src[0]), Cache(src).on_layer)
    short = sender.open(endpoint(receiver), h, 2)
    short.send_layer(0, src[0])
    with pytest.raises(HandoffError, match="1/2 layers"):
        short.finish(timeout=10)
    assert "aborted by sender" in future.result(timeout=5).error

    release = threading.Event()
    h = new_id()

    def stall(layer: int, staging: torch.Tensor) -> None:
        release.wait(10)

    future = receiver.expect(h, 1, nbytes(src[0]), stall)
    slow = sender.open(endpoint(receiver), h, 1)
    slow.send_layer(0, src[0])
    with pytest.raises(HandoffError, match="no ACK within 0.2 s"):
        slow.finish(timeout=0.2)
    release.set()
    # The ABORT queued behind the layer being delivered: the receiver's result stands.
    assert future.result(timeout=5).ok


def test_bad_arguments() -> None:
    rx, tx = SocketKVReceiver(), SocketKVSender()
    with pytest.raises(ValueError):
        rx.expect("not-a-uuid", 1, 1, lambda layer, t: None)
    h = new_id()
    rx.expect(h, 1, 1, lambda layer, t: None)
    with pytest.raises(ValueError, match="already expected"):
        rx.expect(h, 1, 1, lambda layer, t: None)
    with pytest.raises(HandoffError, match="cannot connect"):
        tx.open(format_endpoint("127.0.0.1", _closed_port()), h, 1)
    assert parse_endpoint("tcp://[::1]:7000") == ("::1", 7000)
    assert format_endpoint("::1", 7000) == "tcp://[::1]:7000"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.005)
