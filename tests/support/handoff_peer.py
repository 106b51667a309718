"""The two sides of a KV handoff test, shared by the transport tests on CPU and on a GPU.

    test (decode engine + receiver)  --pipe: commands-->  PeerProcess (spawned prefill process:
       Handoff: reserved blocks,     <--pipe: outcomes--  an AutoKVSender on its device; seeded
       what should arrive in them                         layers, or a prefill engine's KV)

Also the engine runs both sides compare: `greedy` (an aggregated engine's tokens), `push_prefill`
(a prefill engine pushing each prompt's KV through a channel), `expect_prompts` and
`decode_after` (the decode engine reserving, receiving and finishing those prompts).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import torch

from kvmesh.kernels.block_copy import gather_blocks_ref
from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.handoff.auto import AutoKVSender
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.transport import HandoffError, HandoffResult, KVSendChannel

Prompts = dict[str, list[int]]  # request (handoff) id -> prompt token ids


def make_layers(
    seed: int, num_layers: int, shape: tuple[int, ...], dtype: str = "float32"
) -> list[torch.Tensor]:
    """A handoff's KV, on the host: the same for the same seed in any process."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(getattr(torch, dtype)) for _ in range(num_layers)]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- engines ----------------------------------------------------------------------------------


def run(engine: Engine, tokens: dict[str, list[int]]) -> dict[str, list[int]]:
    """Step `engine` until it has no work, appending each request's new tokens to `tokens`."""
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def greedy(
    config: dict[str, Any], prompts: Prompts, params: SamplingParams
) -> dict[str, list[int]]:
    """Every token an aggregated engine of `config` generates for the prompts."""
    engine = Engine(EngineConfig(**config))
    for hid, prompt in prompts.items():
        engine.add_request(hid, prompt, params)
    return run(engine, {hid: [] for hid in prompts})


def push_prefill(
    engine: Engine, open_channel: Callable[[str, int], KVSendChannel], prompts: Prompts,
    params: SamplingParams, wait_s: float,
) -> tuple[dict[str, int], list[KVSendChannel]]:  # fmt: skip
    """Prefill the prompts on a prefill engine, pushing each one's KV through the channel
    `open_channel(hid, num_layers)` gives (finished, ACKed): (first token by id, the channels)."""
    pusher = KVPusher(engine)
    engine.export_hook = pusher
    channels = {}
    for hid, prompt in prompts.items():
        channels[hid] = open_channel(hid, engine.model_config.num_layers)
        pusher.register(hid, channels[hid])
        engine.add_request(hid, prompt, params)
    first = {hid: tokens[0] for hid, tokens in run(engine, {hid: [] for hid in prompts}).items()}
    for channel in channels.values():
        channel.finish(wait_s)
    return first, list(channels.values())


def expect_prompts(engine: Engine, rx: Any, prompts: Prompts) -> dict[str, Future[HandoffResult]]:
    """Reserve each prompt's blocks on a decode engine and have `rx` expect its KV there."""
    futures = {}
    for hid, prompt in prompts.items():
        blocks = engine.reserve(hid, len(prompt))
        assert blocks is not None
        nbytes = layer_nbytes(engine, len(blocks))
        futures[hid] = rx.expect(
            hid, engine.model_config.num_layers, nbytes, scatter_into(engine, blocks)
        )
    return futures


def decode_after(
    engine: Engine, prompts: Prompts, first: dict[str, int],
    futures: dict[str, Future[HandoffResult]], params: SamplingParams, wait_s: float,
) -> dict[str, list[int]]:  # fmt: skip
    """Every token of the prompts once their KV arrived: the first (prefill's), then decode's."""
    for hid, prompt in prompts.items():
        result = futures[hid].result(wait_s)
        assert result.ok, result.error
        engine.commit(hid, prompt, first[hid], params)
    return run(engine, {hid: [first[hid]] for hid in prompts})


# ---- the prefill process ----------------------------------------------------------------------


def _corrupting(scatter: Callable[..., None], writes: dict[str, int]) -> Callable[..., None]:
    """`scatter`, except that the write numbered writes['corrupt'] (from 0) goes wrong."""

    def faulty_scatter(kv_layer: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
        scatter(kv_layer, ids, src)
        if writes["count"] == writes["corrupt"]:  # a copy that went wrong on the way
            kv_layer[0, int(ids[0])].view(-1)[0] += 1.0
        writes["count"] += 1

    return faulty_scatter


def prefill_main(
    conn: Connection, device: str, engine_config: dict[str, Any], wait_s: float
) -> None:
    """A prefill process on `device`: runs the test's commands with an AutoKVSender."""
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    from kvmesh.shared.handoff.ipc import sender as ipc_sender

    writes = {"count": 0, "corrupt": -1}
    ipc_sender.scatter_blocks = _corrupting(ipc_sender.scatter_blocks, writes)
    ipc_sender.scatter_blocks_ref = _corrupting(ipc_sender.scatter_blocks_ref, writes)
    tx = AutoKVSender(torch.device(device))
    while True:
        op, args = conn.recv()
        if op == "quit":
            tx.close()
            conn.send("bye")
            return
        if op == "transport_for":
            conn.send(tx.transport_for(args["kv_endpoint"]))
        elif op == "handoff":
            conn.send(_handoff(tx, conn, writes, device, wait_s, **args))
        elif op == "prefill":
            conn.send(_prefill(tx, engine_config, wait_s, **args))


def _handoff(
    tx: AutoKVSender, conn: Connection, writes: dict[str, int], device: str, wait_s: float,
    kv_endpoint: str, hid: str, shape: tuple[int, ...], num_layers: int, seed: int,
    dtype: str = "float32", corrupt: int | None = None, pause_before: int | None = None,
) -> tuple[str, str, str]:  # fmt: skip
    """Push one handoff of seeded layers: (outcome, transport, error). `corrupt`: that layer's
    copy goes wrong; `pause_before`: report 'paused' before that layer, then wait for a word."""
    try:
        channel = tx.open(kv_endpoint, hid, num_layers)
    except HandoffError as exc:
        return "open failed", "", str(exc)
    transport = getattr(channel, "transport", "socket")
    if corrupt is not None:
        writes["corrupt"] = writes["count"] + corrupt
    for layer, data in enumerate(make_layers(seed, num_layers, shape, dtype)):
        if layer == pause_before:
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # the layers before it are in the receiver's blocks
            conn.send(("paused", transport, ""))
            conn.recv()
        try:
            channel.send_layer(layer, data.to(device))
        except HandoffError as exc:
            return "send failed", transport, str(exc)
    try:
        channel.finish(wait_s)
    except HandoffError as exc:
        return "failed", transport, str(exc)
    return "acked", transport, ""


def _prefill(
    tx: AutoKVSender, engine_config: dict[str, Any], wait_s: float, kv_endpoint: str,
    prompts: Prompts, max_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """Prefill the prompts on an engine of this process, pushing their KV: first tokens, the
    transports taken, the engine's free blocks after."""
    engine = Engine(EngineConfig(role=Role.PREFILL, **engine_config))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    first, channels = push_prefill(engine, partial(tx.open, kv_endpoint), prompts, params, wait_s)
    transports = {getattr(c, "transport", "socket") for c in channels}
    return {"first": first, "transports": transports, "free": engine.pool.num_free}


class PeerProcess:
    """A spawned prefill process (prefill_main) and its command pipe."""

    def __init__(
        self, device: str, engine_config: dict[str, Any], wait_s: float, answer_s: float
    ) -> None:
        """`wait_s`: how long the process waits for an ACK; `answer_s`: for its answers."""
        self.answer_s = answer_s
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, device, engine_config, wait_s)
        self.proc = ctx.Process(target=prefill_main, args=args, daemon=True)
        self.proc.start()
        child.close()

    def call(self, op: str, **args: Any) -> Any:
        self.conn.send((op, args))
        return self.recv()

    def recv(self) -> Any:
        assert self.conn.poll(self.answer_s), "the prefill process did not answer"
        return self.conn.recv()

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("quit", {}))
            self.conn.poll(30)
            self.proc.join(30)


# ---- the decode side --------------------------------------------------------------------------


class Handoff:
    """A handoff the decode engine reserved blocks for and `rx` expects; a PeerProcess sends it
    (`args`)."""

    def __init__(
        self, decode: Engine, rx: Any, num_tokens: int, seed: int, dtype: str = "float32"
    ) -> None:
        self.decode, self.hid, self.seed, self.dtype = decode, str(uuid.uuid4()), seed, dtype
        blocks = decode.reserve(self.hid, num_tokens)
        assert blocks is not None
        self.blocks = blocks
        self.shape = (2, len(blocks), *decode.kv_cache.shape[3:])
        self.num_layers = decode.model_config.num_layers
        nbytes = layer_nbytes(decode, len(blocks))
        self.future: Future[HandoffResult] = rx.expect(
            self.hid, self.num_layers, nbytes, scatter_into(decode, blocks)
        )

    def args(self, kv_endpoint: str, **extra: Any) -> dict[str, Any]:
        """The 'handoff' command's arguments."""
        return dict(kv_endpoint=kv_endpoint, hid=self.hid, shape=self.shape, seed=self.seed,
                    num_layers=self.num_layers, dtype=self.dtype, **extra)  # fmt: skip

    def layer(self, layer: int) -> torch.Tensor:
        """What the decode cache holds in this handoff's blocks of `layer` (on the host)."""
        cache = self.decode.kv_cache[layer]
        return gather_blocks_ref(cache, torch.tensor(self.blocks, device=cache.device)).cpu()

    def sent(self) -> list[torch.Tensor]:
        return make_layers(self.seed, self.num_layers, self.shape, self.dtype)

    def arrived_intact(self) -> bool:
        return all(torch.equal(self.layer(i), x) for i, x in enumerate(self.sent()))

    def release(self) -> None:
        """What decode does with a handoff that will not be decoded: its blocks go back."""
        assert self.decode.abort(self.hid)
