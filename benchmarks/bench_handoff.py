"""KV handoff over NCCL between two GPUs: bandwidth vs plain torch.distributed, and TTFT.

    python benchmarks/bench_handoff.py [--layers 32] [--sizes-mib 4,16,64,256]

This process is the prefill side on cuda:0; a spawned process is the decode side on cuda:1. The
decode process serves Decode.OpenKVLink (nccl/link.serve_links), so the handoff sets up its pair
as the mesh does: unique id over gRPC, HELLO(link id) on the control connection (once, before
any timing).

1. Bandwidth: `layers` layers of S bytes each, all queued at once, for one handoff and for a
   batch of 4 (four requests' layers sent as one group per layer). torch.distributed: rank 0
   dist.send()s the same number of S-byte messages, rank 1 dist.recv()s them (one NCCL op each,
   back to back), timed from a barrier to the sender's synchronize. Handoff: every layer of
   every handoff queued in one call (send_layer_runs: KV that already exists), then finish()
   of every handoff (the receiver verified every checksum and ACKed), timed from the queueing
   to the last ACK, so it includes the control round trips. A handoff's layers are slices of
   one buffer, as KVPusher gathers them (so layers queued together may go as one message).
   Queued layer by layer (a diagnostic row): send_layer_group once per layer, as a prefill
   that produces its layers one at a time does, but back to back.
   Raw binding (a diagnostic row): the torch.distributed measurement, but through kvmesh's own
   ctypes binding on a pair communicator made as the handoff makes its pairs (connect_pair):
   no control frames, no checksums. Raw binding vs torch.distributed is the binding's cost;
   handoff vs raw binding is the protocol's. Best of `reps` each, the measurements taken round
   robin (a repetition of each in turn), so that the machine's drift touches them alike.
2. TTFT, Llama-3-8B shape (synthetic weights), bf16, one 2,048-token prompt: the prefill engine
   alone (add_request -> first token), and with the handoff to a decode engine on cuda:1 that
   reserved blocks (add_request -> first token and the receiver's ACK). Median of `reps`.
3. --timeline (a diagnostic): where each layer's time goes, from both processes' marks
   (shared/handoff/timeline), for one handoff of 32 x --timeline-mib MiB (all queued at once)
   and for one TTFT prompt, in ms from the first send_layer (TTFT: from add_request).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from common import header, table

from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.nccl.channel import send_layer_group, send_layer_runs
from kvmesh.shared.handoff.nccl.link import serve_links
from kvmesh.shared.handoff.nccl.pair import NcclFabric, PairComm, connect_pair
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender
from kvmesh.shared.handoff.nccl.streams import DeviceStreams
from kvmesh.shared.handoff.timeline import RECEIVER_POINTS, SENDER_POINTS, WHOLE, Timeline, by_layer

PREFILL_DEV, DECODE_DEV = torch.device("cuda:0"), torch.device("cuda:1")
MIB = 1 << 20
TTFT_MODEL = "synthetic:llama3-8b"


def engine_config(role: Role, device: torch.device) -> EngineConfig:
    return EngineConfig(
        model=TTFT_MODEL, role=role, device=str(device), dtype="bfloat16", num_blocks=1024,
        max_num_batched_tokens=2048, max_num_seqs=8,
    )  # fmt: skip


# ---- decode side -----------------------------------------------------------------------------


def decode_main(conn: Connection, dist_port: int, switch_interval: float) -> None:
    sys.setswitchinterval(switch_interval)
    torch.cuda.set_device(DECODE_DEV)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{dist_port}", rank=1, world_size=2,
        device_id=DECODE_DEV,
    )  # fmt: skip
    rx = NcclKVReceiver(DECODE_DEV)
    endpoint = rx.start()
    _links, address = serve_links(rx)  # Decode.OpenKVLink: the pair's unique id
    conn.send((endpoint, address))
    engine: Engine | None = None
    raw: PairComm | None = None
    stream = torch.cuda.Stream(DECODE_DEV)  # the raw binding's recvs
    futures: dict[str, Any] = {}
    while True:
        op, args = conn.recv()
        if op == "quit":
            conn.send("bye")
            os._exit(0)  # no teardown handshakes: the parent is exiting too
        if op == "dist_recv":
            nbytes, layers = args
            buf = torch.empty(nbytes, dtype=torch.uint8, device=DECODE_DEV)
            dist.barrier()
            for _ in range(layers):
                dist.recv(buf, src=0)
            torch.cuda.synchronize()
            conn.send(True)
        elif op == "raw_pair":
            raw = connect_pair(NcclFabric(), DeviceStreams(DECODE_DEV), args, 1, 120)
            conn.send(True)
        elif op == "raw_recv":
            assert raw is not None
            nbytes, layers = args
            buf = torch.empty(nbytes, dtype=torch.uint8, device=DECODE_DEV)
            dist.barrier()
            for _ in range(layers):
                raw.recv(buf, 0, stream)
            stream.synchronize()
            conn.send(True)
        elif op == "expect":
            hid, layers, nbytes = args
            futures[hid] = rx.expect(hid, layers, nbytes, lambda layer, payload: None)
            conn.send(True)
        elif op == "engine":
            engine = Engine(engine_config(Role.DECODE, DECODE_DEV))
            conn.send(True)
        elif op == "reserve":
            assert engine is not None
            hid, n = args
            blocks = engine.reserve(hid, n)
            assert blocks is not None
            on_layer = scatter_into(engine, blocks)
            nbytes = layer_nbytes(engine, len(blocks))
            futures[hid] = rx.expect(hid, engine.model_config.num_layers, nbytes, on_layer)
            conn.send(True)
        elif op == "result":
            result = futures.pop(args).result(120)
            if engine is not None:
                engine.abort(args)  # give the blocks back for the next repetition
            conn.send((result.ok, result.error))
        elif op == "timeline":  # start recording (True), or stop and return the marks
            marks = []
            if rx.timeline is not None:
                rx.timeline.close()  # its watchers marked what they were given
                marks = rx.timeline.marks
            rx.timeline = Timeline() if args else None
            conn.send(marks)


class Decode:
    def __init__(self, switch_interval: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=decode_main, args=(child, port, switch_interval), daemon=True
        )
        self.proc.start()
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
            device_id=PREFILL_DEV,
        )  # fmt: skip
        self.endpoint, self.address = self.conn.recv()  # KV (nccl://), gRPC (OpenKVLink)

    def call(self, op: str, args: Any = None) -> Any:
        self.conn.send((op, args))
        return self.conn.recv()

    def stop(self) -> None:
        self.call("quit")
        self.proc.join(60)


# ---- bandwidth -------------------------------------------------------------------------------


def sends_seconds(
    decode: Decode, op: str, buf: torch.Tensor, layers: int,
    send: Callable[[torch.Tensor], None], wait: Callable[[], None],
) -> float:  # fmt: skip
    """Seconds of `layers` back-to-back sends of buf while the decode side runs `op` (its
    matching recvs), from a barrier to the sends' completion here."""
    decode.conn.send((op, (buf.numel(), layers)))
    dist.barrier()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(layers):
        send(buf)
    wait()
    elapsed = time.perf_counter() - start
    assert decode.conn.recv()
    return elapsed


def best_seconds(reps: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The best of `reps` seconds of each measure, after a warm-up round, taken round robin (a
    rep of each in turn), so that the machine's drift during the run touches them all alike."""
    best = dict.fromkeys(measures, float("inf"))
    for rep in range(reps + 1):
        for name, measure in measures.items():
            seconds = measure()
            if rep:
                best[name] = min(best[name], seconds)
    return best


def raw_pair(decode: Decode) -> PairComm:
    """Rank 0 of a pair communicator through kvmesh's binding, as the handoff makes its pairs."""
    fabric = NcclFabric()
    unique_id = fabric.unique_id()
    decode.conn.send(("raw_pair", unique_id))
    pair = connect_pair(fabric, DeviceStreams(PREFILL_DEV), unique_id, 0, 120)
    assert decode.conn.recv()
    return pair


def handoff_layers(nbytes: int, layers: int) -> torch.Tensor:
    """A handoff's layers as KVPusher lays them out: one buffer [layers, nbytes], back to back."""
    return torch.randint(0, 255, (layers, nbytes), dtype=torch.uint8, device=PREFILL_DEV)


def handoff_seconds(
    decode: Decode, sender: NcclKVSender, data: torch.Tensor, batch: int, per_layer: bool = False
) -> float:  # fmt: skip
    """Seconds of `batch` handoffs of data's layers, all queued in one call (per_layer: one call
    per layer), from the queueing to the last ACK."""
    layers, nbytes = data.shape
    hids = [str(uuid.uuid4()) for _ in range(batch)]
    for hid in hids:
        assert decode.call("expect", (hid, layers, nbytes))
    channels = [sender.open(decode.endpoint, hid, layers, decode.address) for hid in hids]
    groups = [(layer, [(ch, data[layer]) for ch in channels]) for layer in range(layers)]
    start = time.perf_counter()
    if per_layer:
        for layer, items in groups:
            assert not send_layer_group(layer, items)
    else:
        assert not send_layer_runs([(ch, 0, data) for ch in channels])
    for channel in channels:
        channel.finish(120)
    elapsed = time.perf_counter() - start
    for hid in hids:
        ok, error = decode.call("result", hid)
        assert ok, error
    return elapsed


def bandwidth(
    decode: Decode, sender: NcclKVSender, pair: PairComm, nbytes: int, layers: int, reps: int
) -> dict[str, float]:  # fmt: skip
    """GB/s of torch.distributed (`dist 1`, `dist 4`: the bytes of 1 and 4 handoffs), the raw
    binding, 1 handoff (also queued layer by layer) and 4 handoffs of `layers` x nbytes, each
    the best of `reps`, taken round robin."""
    data = handoff_layers(nbytes, layers)
    buf = data[0]
    stream = torch.cuda.Stream(PREFILL_DEV)
    torch.cuda.synchronize()

    def dist_sends(batch: int) -> float:
        return sends_seconds(decode, "dist_recv", buf, layers * batch,
                             lambda x: dist.send(x, dst=1), torch.cuda.synchronize)  # fmt: skip

    best = best_seconds(reps, {
        "dist 1": lambda: dist_sends(1),
        "raw": lambda: sends_seconds(decode, "raw_recv", buf, layers,
                                     lambda x: pair.send(x, 1, stream), stream.synchronize),
        "handoff 1": lambda: handoff_seconds(decode, sender, data, 1),
        "by layer": lambda: handoff_seconds(decode, sender, data, 1, per_layer=True),
        "dist 4": lambda: dist_sends(4),
        "handoff 4": lambda: handoff_seconds(decode, sender, data, 4),
    })  # fmt: skip
    return {name: nbytes * layers * (4 if name.endswith("4") else 1) / seconds / 1e9
            for name, seconds in best.items()}  # fmt: skip


# ---- TTFT ------------------------------------------------------------------------------------


def ttft(
    engine: Engine, prompt: list[int], decode: Decode | None, sender: NcclKVSender | None,
    pusher: KVPusher | None, clock: list[float] | None = None,
) -> tuple[float, float]:  # fmt: skip
    """(seconds to the first token, seconds to first token + ACK) of one prompt; `clock`, if
    given, gets the perf_counter of add_request."""
    hid = str(uuid.uuid4())
    channel = None
    if decode is not None and sender is not None and pusher is not None:
        assert decode.call("reserve", (hid, len(prompt)))
        layers = engine.model_config.num_layers
        channel = sender.open(decode.endpoint, hid, layers, decode.address)
        pusher.register(hid, channel)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if clock is not None:
        clock.append(start)
    engine.add_request(hid, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    outputs = engine.step()
    first = time.perf_counter() - start
    assert outputs and outputs[0].new_token_ids
    if channel is None:
        return first, first
    channel.finish(120)
    done = time.perf_counter() - start
    assert pusher is not None and decode is not None
    pusher.unregister(hid)
    ok, error = decode.call("result", hid)
    assert ok, error
    return first, done


# ---- timeline --------------------------------------------------------------------------------

_POINTS = ("queued", "launched", "data", "posted", "enqueued", "landed", "summed", "delivered")
_GAPS = [  # (what, from, to) per layer: where its time goes
    ("sender thread: checksums, SUMS + DATA written, sends enqueued", "queued", "launched"),
    ("its DATA frame read by the receiver", "queued", "data"),
    ("receiver enqueues its recv", "data", "posted"),
    ("its checksum enqueued", "posted", "enqueued"),
    ("its recv group lands", "posted", "landed"),
    ("receiver checksum", "landed", "summed"),
    ("delivered after its checksum", "summed", "delivered"),
]


def record(decode: Decode, sender: NcclKVSender, on: bool) -> list[tuple[str, bytes, int, float]]:
    """Start recording both sides' marks (on), or stop and return them all."""
    marks = sender.timeline.marks if sender.timeline is not None else []
    sender.timeline = Timeline() if on else None
    return marks + decode.call("timeline", on)


def print_timeline(title: str, marks: list[tuple[str, bytes, int, float]], key: bytes,
                   t0: float, extra: dict[str, float]) -> None:  # fmt: skip
    """One handoff's marks per layer, in ms from t0, then the median of each gap per layer."""
    at = by_layer(marks, key)
    missing = [p for p in (*SENDER_POINTS, *RECEIVER_POINTS) if p not in at]
    print(f"\n## timeline: {title} (ms from {'add_request' if extra else 'the first send'})")
    if missing:
        print(f"(no marks for {', '.join(missing)})")
    layers = sorted(at.get("queued", {}))
    rows: list[tuple[str, ...]] = []
    for layer in layers:
        cells = [f"{(at[p][layer] - t0) * 1e3:.3f}" if layer in at.get(p, {}) else "-"
                 for p in _POINTS]  # fmt: skip
        rows.append((str(layer), *cells))
    print(table(rows, ("layer", *_POINTS)))
    ends = {"receiver ACK written": at.get("ack", {}).get(WHOLE),
            "sender ACK read": at.get("acked", {}).get(WHOLE), **extra}  # fmt: skip
    print("  ".join(f"{k}: {(v - t0) * 1e3:.3f}" for k, v in ends.items() if v is not None))
    gaps: list[tuple[str, ...]] = []
    for what, a, b in _GAPS:
        d = [at[b][i] - at[a][i] for i in layers if i in at.get(a, {}) and i in at.get(b, {})]
        if d:
            gaps.append((what, f"{a} -> {b}", f"{statistics.median(d) * 1e6:.0f} us",
                         f"{max(d) * 1e6:.0f} us"))  # fmt: skip
    print(table(gaps, ("per layer", "marks", "median", "max")))
    pace = []  # queued: the engine's (or caller's) thread; landed: the wire's progress
    for point in ("queued", "landed", "delivered"):
        ts = sorted(at.get(point, {}).values())
        if len(ts) > 1:
            step = statistics.median(b - a for a, b in zip(ts, ts[1:], strict=False))
            pace.append(f"{point} every {step * 1e6:.0f} us")
    print("median interval between layers: " + ", ".join(pace))
    print(flush=True)


def timeline_handoff(decode: Decode, sender: NcclKVSender, nbytes: int, layers: int) -> None:
    data = handoff_layers(nbytes, layers)
    handoff_seconds(decode, sender, data, 1)  # warm: staging buffers, kernels
    hid = str(uuid.uuid4())
    assert decode.call("expect", (hid, layers, nbytes))
    channel = sender.open(decode.endpoint, hid, layers, decode.address)
    record(decode, sender, True)
    start = time.perf_counter()
    assert not send_layer_runs([(channel, 0, data)])
    channel.finish(120)
    elapsed = time.perf_counter() - start
    ok, error = decode.call("result", hid)
    assert ok, error
    marks = record(decode, sender, False)
    gbs = nbytes * layers / elapsed / 1e9
    title = f"1 handoff x {layers} x {nbytes >> 20} MiB, {gbs:.1f} GB/s"
    print_timeline(title, marks, uuid.UUID(hid).bytes, start, {})


def timeline_ttft(engine: Engine, prompt: list[int], decode: Decode, sender: NcclKVSender,
                  pusher: KVPusher) -> None:  # fmt: skip
    record(decode, sender, True)
    clock: list[float] = []
    first, done = ttft(engine, prompt, decode, sender, pusher, clock)
    marks = record(decode, sender, False)
    key = next(k for p, k, _, _ in marks if p == "queued")
    extra = {"first token": clock[0] + first, "finish() returned": clock[0] + done}
    title = f"TTFT, {len(prompt)}-token prompt, {engine.model_config.num_layers} layers"
    print_timeline(title, marks, key, clock[0], extra)


def prompt_of(length: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 100_000, (length,), generator=gen).tolist()


def ttft_rows(decode: Decode, sender: NcclKVSender, prompt_len: int, reps: int
              ) -> tuple[list[tuple[str, ...]], Engine, KVPusher]:  # fmt: skip
    """The TTFT rows: the prefill engine alone, then with the handoff."""
    engine = Engine(engine_config(Role.PREFILL, PREFILL_DEV))
    assert decode.call("engine")
    prompt = prompt_of(prompt_len)
    for _ in range(2):  # warm-up: kernels compiled
        ttft(engine, prompt, None, None, None)
    alone = [ttft(engine, prompt, None, None, None)[0] for _ in range(reps)]
    pusher = KVPusher(engine)
    engine.export_hook = pusher
    for _ in range(2):  # warm-up: the pair exists
        ttft(engine, prompt, decode, sender, pusher)
    with_handoff = [ttft(engine, prompt, decode, sender, pusher) for _ in range(reps)]
    t_alone = statistics.median(alone)
    t_first = statistics.median(t for t, _ in with_handoff)
    t_acked = statistics.median(t for _, t in with_handoff)
    kv_mib = layer_nbytes(engine, -(-prompt_len // engine.config.block_size)) / MIB
    name = f"TTFT llama3-8b bf16, {prompt_len}-token prompt ({kv_mib:.0f} MiB/layer)"
    rows: list[tuple[str, ...]] = []
    rows.append((name + ": prefill alone", f"{t_alone * 1e3:.2f} ms", "", "", ""))
    rows.append((name + ": first token, with handoff", "", f"{t_first * 1e3:.2f} ms",
                 f"{t_first / t_alone:.3f}x", ""))  # fmt: skip
    rows.append((name + ": first token + ACK", "", f"{t_acked * 1e3:.2f} ms",
                 f"{t_acked / t_alone:.3f}x", "<= 1.10x"))  # fmt: skip
    for line in rows:
        print(line, flush=True)
    return rows, engine, pusher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--sizes-mib", default="4,16,64,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--timeline", action="store_true", help="also print where the time goes")
    ap.add_argument("--timeline-mib", type=int, default=16)
    ap.add_argument("--skip-ttft", action="store_true", help="bandwidth rows only")
    ap.add_argument("--switch-interval", type=float, default=sys.getswitchinterval(),
                    help="sys.setswitchinterval in both processes (seconds)")  # fmt: skip
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs"
    torch.cuda.set_device(PREFILL_DEV)
    print(header("KV handoff (NCCL)"), flush=True)
    nvls = os.environ.get("NCCL_NVLS_ENABLE")
    print(f"2 x {torch.cuda.get_device_name(0)}; NCCL_NVLS_ENABLE={nvls}", flush=True)
    decode = Decode(args.switch_interval)
    sender = NcclKVSender(PREFILL_DEV)
    pair = raw_pair(decode)
    rows: list[tuple[str, ...]] = []

    def row(what: str, base: float, ours: float, target: str = "") -> None:
        rows.append((what, f"{base:.1f} GB/s", f"{ours:.1f} GB/s", f"{100 * ours / base:.0f}%",
                     target))  # fmt: skip
        print(rows[-1], flush=True)

    for mib in map(int, args.sizes_mib.split(",")):
        gbs = bandwidth(decode, sender, pair, mib * MIB, args.layers, args.reps)
        target = ">= 90%" if mib >= 16 else ""
        what = f"bandwidth, 1 handoff x {args.layers} x {mib} MiB"
        row(f"bandwidth, raw binding x {args.layers} x {mib} MiB (diagnostic)", gbs["dist 1"],
            gbs["raw"])  # fmt: skip
        row(what, gbs["dist 1"], gbs["handoff 1"], target)
        row(what + ", queued layer by layer (diagnostic)", gbs["dist 1"], gbs["by layer"])
        row(f"bandwidth, 4 handoffs x {args.layers} x {mib} MiB", gbs["dist 4"],
            gbs["handoff 4"], target)  # fmt: skip

    if not args.skip_ttft:
        ttft_part, engine, pusher = ttft_rows(decode, sender, args.prompt, args.reps)
        rows += ttft_part
    print()
    print(table(rows, ("what", "torch.distributed / alone", "kvmesh handoff", "ratio", "target")))
    print(flush=True)
    if args.timeline:
        if not args.skip_ttft:
            timeline_ttft(engine, prompt_of(args.prompt), decode, sender, pusher)
            engine.export_hook = None
        timeline_handoff(decode, sender, args.timeline_mib * MIB, args.layers)
    sender.close()
    decode.stop()
    os._exit(0)  # skip NCCL teardown at exit: the results are out


if __name__ == "__main__":
    main()
