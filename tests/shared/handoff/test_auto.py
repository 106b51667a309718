"""Choosing the transport (shared/handoff/auto.py) on a CPU host: endpoints by scheme, and CPU
workers take the TCP transport even where the decode worker offers NCCL too."""

from __future__ import annotations

import uuid

import pytest
import torch

from kvmesh.shared.handoff.auto import AutoKVSender, make_receiver, nccl_unusable, split_endpoints
from kvmesh.shared.handoff.tcp import SocketKVReceiver
from kvmesh.shared.handoff.transport import HandoffError

CPU = torch.device("cpu")

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


def test_split_endpoints() -> None:
    assert split_endpoints("nccl://10.0.0.1:5,tcp://10.0.0.1:6") == {
        "nccl": "nccl://10.0.0.1:5",
        "tcp": "tcp://10.0.0.1:6",
    }
    assert split_endpoints("tcp://[::1]:7") == {"tcp": "tcp://[::1]:7"}
    with pytest.raises(ValueError, match="scheme"):
        split_endpoints("10.0.0.1:5")


@needs_no_cuda
def test_cpu_workers_select_the_socket_transport() -> None:
    assert "not a CUDA device" in nccl_unusable(CPU)
    rx = make_receiver(CPU, "127.0.0.1")
    assert isinstance(rx, SocketKVReceiver)
    endpoint = rx.start()
    try:
        assert endpoint.startswith("tcp://") and "," not in endpoint
        tx = AutoKVSender(CPU)
        assert tx.nccl is None
        both = f"nccl://127.0.0.1:1,{endpoint}"
        assert tx.transport_for(both) == "tcp"
        hid = str(uuid.uuid4())
        got = rx.expect(hid, 1, 8, lambda layer, payload: None)
        channel = tx.open(both, hid, 1)
        channel.send_layer(0, torch.arange(2, dtype=torch.int32))
        channel.finish(10)
        assert got.result(10).ok
        with pytest.raises(HandoffError, match="NCCL: device cpu is not a CUDA device"):
            tx.open("nccl://127.0.0.1:1", str(uuid.uuid4()), 1)
        tx.close()
    finally:
        rx.close()
