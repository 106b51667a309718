"""The decode worker's KV receiver (TCP transport) fed random and mutated frames over real
loopback connections: random bytes, valid headers with fields set at random (kind, version,
magic, layer, num_layers, a payload size up to 2**64 - 1, a crc), truncated frames, frames of
an expected handoff. Whatever arrives, the receiver drops that connection or NACKs the frame,
never stages more than the layer size it expects, and afterwards still delivers a real handoff
bit for bit. KVMESH_FUZZ_INPUTS sets the count (10,000 by default; more for a nightly run)."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import uuid

import torch

from kvmesh.shared.handoff.tcp.frames import HEADER, Header, TcpFrameKind
from kvmesh.shared.handoff.tcp.receiver import SocketKVReceiver
from kvmesh.shared.handoff.tcp.sender import SocketKVSender
from kvmesh.shared.handoff.wire import format_endpoint

INPUTS = int(os.environ.get("KVMESH_FUZZ_INPUTS", "10000"))
LAYER_BYTES = 1024


def _mutated(rng: random.Random, target: bytes) -> bytes:
    """One fuzz input: random bytes, or a frame with fields at random, maybe truncated."""
    shape = rng.randrange(4)
    if shape == 0:
        return rng.randbytes(rng.randrange(0, 3 * HEADER.size))
    header = Header(
        TcpFrameKind(rng.choice(list(TcpFrameKind))),
        target if rng.random() < 0.5 else uuid.uuid4().bytes,
        rng.choice([0, 1, 2, rng.randrange(1 << 16)]),
        rng.choice([0, 2, rng.randrange(1 << 16)]),
        rng.choice([0, 10, LAYER_BYTES, rng.randrange(1 << 32), (1 << 64) - 1]),
        rng.randrange(1 << 32),
    )
    raw = bytearray(header.pack() + rng.randbytes(rng.choice([0, 10, LAYER_BYTES])))
    if shape == 1:  # flip bytes anywhere, the magic and version included
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif shape == 2:  # cut short
        raw = raw[: rng.randrange(len(raw) + 1)]
    return bytes(raw)


def test_random_and_mutated_frames_never_take_the_receiver_down() -> None:
    rx = SocketKVReceiver()
    rx.start()
    tx = SocketKVSender()
    try:
        rng = random.Random(20261208)
        target = uuid.uuid4()  # expected all along: fuzzed frames may name it
        rx.expect(str(target), 2, LAYER_BYTES, lambda layer, staging: None)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(INPUTS):
            data = _mutated(rng, target.bytes)
            with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as conn:
                with contextlib.suppress(OSError):  # dropped before it read all
                    conn.sendall(data)
                    conn.shutdown(socket.SHUT_WR)
                # the receiver ends the connection (after a NACK, maybe) once it has seen the
                # end of the input: never waits for more (a timeout here fails the test); it
                # closing first also keeps loopback's ports free of this side's TIME_WAITs
                with contextlib.suppress(ConnectionError):
                    while conn.recv(4096):
                        pass
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert grown_mib < 256, f"the receiver allocated {grown_mib:.0f} MiB for fuzz input"

        # a real handoff afterwards, bit for bit
        layers = [torch.randn(LAYER_BYTES // 4) for _ in range(2)]
        got: dict[int, torch.Tensor] = {}
        h = str(uuid.uuid4())
        future = rx.expect(h, 2, LAYER_BYTES, lambda i, staging: got.update({i: staging.clone()}))
        channel = tx.open(format_endpoint("127.0.0.1", rx.port), h, 2)
        for i, layer in enumerate(layers):
            channel.send_layer(i, layer)
        channel.finish(timeout=10)
        assert future.result(timeout=5).ok
        for i, layer in enumerate(layers):
            assert torch.equal(got[i].view(torch.float32), layer)
    finally:
        tx.close()
        rx.close()
