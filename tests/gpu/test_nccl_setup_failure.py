"""A failing NCCL setup is harmless, with the real library: a decode process and this prefill
process on the same cuda:0 try to pair 100 times; each ncclCommInitRank fails ("Duplicate GPU
detected") on both ranks, and both processes stay up, their heaps intact, and serve a handoff
afterwards (NCCL's failed init frees the communicator itself: the binding must never tear it
down again, nor while the init runs).

    . tests/gpu/device_env.sh && python -P -m pytest tests/gpu/test_nccl_setup_failure.py

The transport choice never pairs one card with itself (shared/handoff/auto.py); this calls the
NCCL sender directly to make the failing setups happen.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import uuid
from multiprocessing.connection import Connection

import pytest
import torch

from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl.link import serve_links
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender
from kvmesh.shared.handoff.tcp import SocketKVReceiver, SocketKVSender
from kvmesh.shared.handoff.transport import HandoffError

if not torch.cuda.is_available() or nccl.unavailable_reason():
    pytest.skip("needs a CUDA device and NCCL (run on a GPU machine)", allow_module_level=True)

DEVICE = torch.device("cuda:0")
TRIES = 100


def decode_main(conn: Connection) -> None:
    """The decode side: an NCCL receiver on DEVICE (each pair's setup fails) and a TCP one."""
    torch.cuda.set_device(DEVICE)
    rx = NcclKVReceiver(DEVICE, setup_timeout=20)
    tcp = SocketKVReceiver()
    links, address = serve_links(rx)
    conn.send((rx.start(), tcp.start(), address))
    while (op := conn.recv()) != "quit":
        hid, nbytes = op
        future = tcp.expect(hid, 1, nbytes, lambda layer, payload: None)
        conn.send(future.result(60).ok)
    links.stop(None)
    rx.close()
    tcp.close()
    conn.send("bye")


@pytest.mark.timeout(900)  # a setup that hangs instead of failing is a failure too
def test_a_hundred_failed_nccl_setups_leave_both_processes_serving() -> None:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=decode_main, args=(child,), daemon=True)
    proc.start()
    child.close()
    assert conn.poll(120)
    nccl_endpoint, tcp_endpoint, address = conn.recv()
    tx = NcclKVSender(DEVICE, setup_timeout=20)
    try:
        errors = []
        for _ in range(TRIES):
            with pytest.raises(HandoffError) as failed:
                tx.open(nccl_endpoint, str(uuid.uuid4()), 1, address)
            errors.append(str(failed.value))
            gc.collect()  # frees what the failed setup left, while NCCL's threads still run
        assert any("Duplicate GPU" in e or "ncclInvalidUsage" in e for e in errors), errors[:3]
        assert tx.peers == []
        assert proc.is_alive()  # the decode process survived its 100 failed inits
        # both still serve: a handoff over TCP
        tcp = SocketKVSender()
        data = torch.arange(1024, dtype=torch.int32)
        hid = str(uuid.uuid4())
        conn.send((hid, data.numel() * data.element_size()))
        channel = tcp.open(tcp_endpoint, hid, 1)
        channel.send_layer(0, data)
        channel.finish(60)
        assert conn.poll(60) and conn.recv() is True
        tcp.close()
    finally:
        tx.close()
        if proc.is_alive():
            conn.send("quit")
            conn.poll(30)
        proc.join(30)
    assert proc.exitcode == 0  # no abort (-6) on the way out either
