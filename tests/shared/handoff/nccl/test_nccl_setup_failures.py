"""A failed NCCL setup is harmless: the prefill keeps serving over TCP, a failing peer is set up
a bounded number of times (not once per request), two ends on one device never try, and the
binding never asks NCCL to tear down a communicator whose init has not returned (a failed
blocking init frees it itself)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from kvmesh.shared.handoff.auto import AutoKVSender, MultiKVReceiver
from kvmesh.shared.handoff.backoff import SetupBackoff
from kvmesh.shared.handoff.locality import Place, here
from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl.link import offer_link
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender
from kvmesh.shared.handoff.tcp import SocketKVReceiver

CPU = torch.device("cpu")
DUPLICATE = "Duplicate GPU detected : rank 0 and rank 1 both on CUDA device 60"


class FailingComm:
    """A rank whose init fails as ncclCommInitRank does for two ranks on one card."""

    def __init__(self, fabric: FailingFabric, rank: int) -> None:
        self.fabric, self.rank, self.closed = fabric, rank, False

    def init(self) -> None:
        with self.fabric.lock:
            self.fabric.inits[self.rank] += 1
        raise nccl.NcclError("ncclCommInitRank", 5, DUPLICATE)

    def send(self, data: torch.Tensor, peer: int, stream: object) -> None:
        raise AssertionError("a pair that never set up sends nothing")

    recv = send

    def check(self) -> None:
        pass

    def abort(self) -> None:
        self.closed = True


class FailingFabric:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inits: Counter[int] = Counter()  # by rank: 0 the sender's, 1 the receiver's

    def unique_id(self) -> bytes:
        return os.urandom(nccl.UNIQUE_ID_BYTES)

    def communicator(self, unique_id: bytes, rank: int) -> FailingComm:
        return FailingComm(self, rank)

    def group(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.fixture
def fabric() -> FailingFabric:
    return FailingFabric()


@contextlib.contextmanager
def decode_side(fabric: FailingFabric, tagged: bool) -> Iterator[tuple[MultiKVReceiver, str]]:
    """A decode worker's receivers (NCCL whose setups fail, TCP) and its kv_endpoint; `tagged`:
    the endpoint says where it is (here), else the sender cannot tell."""
    nccl_rx = NcclKVReceiver(CPU, fabric=fabric, setup_timeout=10)
    rx = MultiKVReceiver([nccl_rx, SocketKVReceiver()], here(CPU) if tagged else None)
    try:
        yield rx, rx.start()
    finally:
        rx.close()


def prefill_side(fabric: FailingFabric, rx: MultiKVReceiver, backoff: SetupBackoff) -> AutoKVSender:
    """A prefill worker's sender whose NCCL uses `fabric` (a CUDA prefill's, on a CPU host)."""
    nccl_rx = rx.receivers[0]

    def links(address: str, endpoint: str, link_id: str, unique_id: bytes, timeout: float):
        offer_link(nccl_rx, link_id, unique_id)  # what Decode.OpenKVLink does

    tx = AutoKVSender(CPU)
    tx.nccl = NcclKVSender(CPU, fabric=fabric, links=links, setup_timeout=10)
    tx.why_not_nccl, tx.backoff = "", backoff
    return tx


def handoff(tx: AutoKVSender, rx: MultiKVReceiver, endpoint: str, seed: int) -> str:
    """One 2-layer handoff; asserts it arrived intact; the transport it took."""
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.randn(2, 3, 4, 2, 8, generator=gen) for _ in range(2)]
    store: dict[int, torch.Tensor] = {}
    hid = str(uuid.uuid4())
    nbytes = layers[0].numel() * layers[0].element_size()
    future = rx.expect(hid, 2, nbytes, lambda i, payload: store.__setitem__(i, payload.clone()))
    channel = tx.open(endpoint, hid, 2)
    for i, layer in enumerate(layers):
        channel.send_layer(i, layer)
    channel.finish(10)
    assert future.result(10).ok
    assert all(torch.equal(store[i].view(torch.float32).view(x.shape), x)
               for i, x in enumerate(layers))  # fmt: skip
    return getattr(channel, "transport", "socket")


def test_a_hundred_failing_setups_in_a_row_cost_a_bounded_number_of_inits(fabric) -> None:
    backoff = SetupBackoff(first_s=0.0, max_failures=5)  # no pause: every request may try
    with decode_side(fabric, tagged=False) as (rx, endpoint):
        tx = prefill_side(fabric, rx, backoff)
        try:
            assert tx.transport_for(endpoint) == "nccl"
            transports = [handoff(tx, rx, endpoint, seed) for seed in range(100)]
            assert transports == ["socket"] * 100  # every request served, over TCP
            assert fabric.inits[0] == 5  # then the peer is not tried again
            assert fabric.inits[1] <= 5
            assert tx.nccl is not None and tx.nccl.peers == []
            assert rx.receivers[0].num_links == 0  # type: ignore[attr-defined]
        finally:
            tx.close()


def test_requests_that_come_during_a_failing_setup_do_not_each_try(fabric) -> None:
    with decode_side(fabric, tagged=False) as (rx, endpoint):
        tx = prefill_side(fabric, rx, SetupBackoff(first_s=30.0))
        try:
            with ThreadPoolExecutor(8) as pool:
                transports = list(pool.map(lambda s: handoff(tx, rx, endpoint, s), range(16)))
            assert transports == ["socket"] * 16
            assert fabric.inits[0] == 1  # one setup; the others waited for its outcome
        finally:
            tx.close()


def test_two_ends_on_one_device_never_try_nccl(fabric) -> None:
    with decode_side(fabric, tagged=True) as (rx, endpoint):
        assert "dev=cpu" in endpoint.split(",")[0]
        tx = prefill_side(fabric, rx, SetupBackoff())
        try:
            assert tx.transport_for(endpoint) == "tcp"
            assert [handoff(tx, rx, endpoint, seed) for seed in range(3)] == ["socket"] * 3
            assert fabric.inits == Counter()
        finally:
            tx.close()


def test_one_card_is_one_device_across_hosts_ids_and_the_cpu_is_not() -> None:
    card, other_card = "GPU-6a1e0c2d-0000-0000-0000-000000000001", "GPU-6a1e0c2d-0000-0000-0000-2"
    assert Place("host-a", card).same_device(Place("container-b", card))  # one card
    assert not Place("host-a", card).same_device(Place("host-a", other_card))
    assert Place("host-a", "cpu").same_device(Place("host-a", "cpu"))
    assert not Place("host-a", "cpu").same_device(Place("host-b", "cpu"))
    assert not Place("host-a", card).same_device(None)


def test_the_backoff_doubles_then_gives_up() -> None:
    now = [0.0]
    backoff = SetupBackoff(first_s=1.0, max_s=1.5, max_failures=3, clock=lambda: now[0])
    assert backoff.acquire("p") == ""
    backoff.release("p", "boom")
    assert "retried in 1.0 s after 1 failed setups (boom)" in backoff.acquire("p")
    now[0] = 1.0
    assert backoff.acquire("p") == ""
    backoff.release("p", "boom")  # the second failure: 2 s, capped at 1.5
    now[0] = 2.4
    assert "retried in 0.1 s" in backoff.acquire("p")
    now[0] = 2.5
    assert backoff.acquire("p") == ""
    backoff.release("p", "boom")
    now[0] = 1e6
    assert "not tried again after 3 failed setups (last: boom)" in backoff.acquire("p")
    assert backoff.attempts == 3
    assert backoff.acquire("q") == ""  # other peers are not affected
    backoff.release("q")
    assert backoff.acquire("q") == "" and backoff.acquire("q") == ""  # proven: no queueing


# ---- the binding's teardown vs init ------------------------------------------------------------


class BlockingLibrary:
    """Stands in for libnccl's calls (this host has no GPU): ncclCommInitRank blocks until
    `finish` says how it ends; a failing one frees the communicator (as NCCL does), so a
    teardown of it afterwards would be a double free."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.finish = threading.Event()
        self.fail = False
        self.freed: set[int] = set()

    def call(self, name: str, *args: Any, hold_gil: bool = False) -> int:
        self.calls.append(name)
        if name == "ncclCommInitRank":
            handle = args[0]._obj  # the c_void_p NCCL writes early, then frees on failure
            handle.value = 0x1000
            self.finish.wait(10)
            if self.fail:
                self.freed.add(0x1000)
                handle.value = None
                raise nccl.NcclError(name, 5, DUPLICATE)
        elif name in ("ncclCommAbort", "ncclCommDestroy"):
            address = args[0].value
            assert address not in self.freed, f"{name} of a freed communicator"
            self.freed.add(address)
        return 0


def start_init(comm: nccl.Communicator) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            comm.init()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("init_fails", [True, False])
def test_an_abort_during_init_waits_for_the_init(init_fails: bool) -> None:
    lib = BlockingLibrary()
    comm = nccl.Communicator(lib, 2, bytes(nccl.UNIQUE_ID_BYTES), 0)  # type: ignore[arg-type]
    thread, errors = start_init(comm)
    while "ncclCommInitRank" not in lib.calls:
        time.sleep(0.001)
    comm.abort()  # from another thread, while NCCL is inside the init
    assert comm.closed and lib.calls == ["ncclCommInitRank"]  # NCCL not asked yet
    lib.fail = init_fails
    lib.finish.set()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], nccl.NcclError)
    # a failed init freed it (nothing to tear down); a successful one is aborted by init()
    assert lib.calls == ["ncclCommInitRank"] + ([] if init_fails else ["ncclCommAbort"])
    comm.abort()
    comm.destroy()
    assert lib.calls.count("ncclCommAbort") == (0 if init_fails else 1)


def test_a_failed_init_is_never_torn_down() -> None:
    lib = BlockingLibrary()
    lib.fail = True
    lib.finish.set()
    comm = nccl.Communicator(lib, 2, bytes(nccl.UNIQUE_ID_BYTES), 0)  # type: ignore[arg-type]
    with pytest.raises(nccl.NcclError, match="Duplicate GPU"):
        comm.init()
    comm.abort()
    assert lib.calls == ["ncclCommInitRank"]
    assert comm.async_error() == 0 and comm.handle is None
    with pytest.raises(nccl.NcclError, match="not initialized or was torn down"):
        comm.send(torch.zeros(1), 1, None)  # type: ignore[arg-type]
