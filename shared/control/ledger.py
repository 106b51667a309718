"""Redis control plane: worker registry and KV block-set ownership (ARCHITECTURE.md invariant 3).

Every write is one Lua script (atomic, one round trip), fenced by (worker_id, generation): a
worker gets a new generation each time it registers, and a call carrying another generation, or
made after the worker's record expired, changes nothing and returns False. Expiry uses the
server's clock (TIME), never the caller's.

A block set is one request's KV on one worker for one handoff. A handoff has at most one
destination set (state `reserved`, then `owned` once the KV has arrived: the decode side) and at
most one source set (state `sending`: the prefill side, while it pushes). Every set has a lease
that the owner's heartbeat renews; `reap()` deletes sets whose lease ran out (owner crashed) and
sets of owners whose record is gone or whose generation moved on (owner restarted).

Keys (prefix P, default "kvmesh:"); scripts build keys inside, so this needs a standalone
(non-cluster) Redis/valkey:

    P gen:<worker>          counter, the worker's last generation (never expires)
    P w:<worker>            hash, WorkerInfo fields; TTL = heartbeat TTL
    P workers               set of worker ids (dead ones are pruned by reap)
    P bs:<handoff>:dst|src  hash: owner generation handoff_id state blocks peer lease_ms created_ms
    P owned:<worker>        set of the worker's block-set keys
    P owners                set of workers owning at least one block set
    P leases                zset: block-set key -> lease expiry (server ms)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import redis.asyncio as redis

ROLES = ("prefill", "decode", "aggregated")
RESERVED, OWNED, SENDING = "reserved", "owned", "sending"
_SIDE = {RESERVED: "dst", OWNED: "dst", SENDING: "src"}
_INITIAL_STATES = (RESERVED, SENDING)
_TRANSITIONS = {OWNED: RESERVED}  # new state -> the state it must come from (commit)
Arg = str | int  # a script argument


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the registry knows it; capacity fields are the last heartbeat's."""

    worker_id: str
    role: str  # 'prefill' | 'decode' | 'aggregated'
    address: str  # host:port of its gRPC server
    kv_endpoint: str  # KV data-plane endpoint (e.g. tcp://host:port); may be empty
    model: str
    generation: int = 0  # assigned by Ledger.register
    free_blocks: int = 0
    total_blocks: int = 0
    queue_depth: int = 0  # requests waiting for admission
    running: int = 0  # requests in the running batch

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


# Helpers shared by every script. ARGV[1] is always the key prefix. Numbers written to Redis
# go through string.format('%d') because Lua numbers are doubles and would otherwise be
# formatted as 1.7e+12.
_PRELUDE = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(n) return string.format('%d', n) end
local function fenced(wid, gen)
  return redis.call('HGET', P .. 'w:' .. wid, 'generation') == gen
end
local function drop_set(key, owner)
  local hid = redis.call('HGET', key, 'handoff_id') or ''
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'leases', key)
  redis.call('SREM', P .. 'owned:' .. owner, key)
  if redis.call('SCARD', P .. 'owned:' .. owner) == 0 then
    redis.call('SREM', P .. 'owners', owner)
  end
  return hid
end
local function hash_table(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
"""

# ARGV: P, worker_id, ttl_ms, field1, value1, ...   -> new generation
_REGISTER = """
local wid = ARGV[2]
local gen = int(redis.call('INCR', P .. 'gen:' .. wid))
local key = P .. 'w:' .. wid
redis.call('DEL', key)
redis.call('HSET', key, 'generation', gen, unpack(ARGV, 4))
redis.call('PEXPIRE', key, ARGV[3])
redis.call('SADD', P .. 'workers', wid)
return tonumber(gen)
"""

# ARGV: P, worker_id, generation, ttl_ms, free_blocks, total_blocks, queue_depth, running
_HEARTBEAT = """
local wid, gen = ARGV[2], ARGV[3]
if not fenced(wid, gen) then return 0 end
local wkey = P .. 'w:' .. wid
redis.call('HSET', wkey, 'free_blocks', ARGV[5], 'total_blocks', ARGV[6],
           'queue_depth', ARGV[7], 'running', ARGV[8])
redis.call('PEXPIRE', wkey, ARGV[4])
local now = now_ms()
for _, key in ipairs(redis.call('SMEMBERS', P .. 'owned:' .. wid)) do
  local s = redis.call('HMGET', key, 'generation', 'lease_ms')
  if s[1] == gen then
    redis.call('ZADD', P .. 'leases', 'XX', int(now + tonumber(s[2])), key)
  end
end
return 1
"""

# ARGV: P, worker_id, generation
_DEREGISTER = """
local wid, gen = ARGV[2], ARGV[3]
if not fenced(wid, gen) then return 0 end
for _, key in ipairs(redis.call('SMEMBERS', P .. 'owned:' .. wid)) do drop_set(key, wid) end
redis.call('DEL', P .. 'w:' .. wid)
redis.call('SREM', P .. 'workers', wid)
return 1
"""

# ARGV: P, owner, generation, handoff_id, side, state, blocks, peer, lease_ms
_RESERVE = """
local owner, gen, hid, side = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not fenced(owner, gen) then return 0 end
local key = P .. 'bs:' .. hid .. ':' .. side
if redis.call('EXISTS', key) == 1 then return 0 end
local now = now_ms()
redis.call('HSET', key, 'owner', owner, 'generation', gen, 'handoff_id', hid, 'state', ARGV[6],
           'blocks', ARGV[7], 'peer', ARGV[8], 'lease_ms', ARGV[9], 'created_ms', int(now))
redis.call('ZADD', P .. 'leases', int(now + tonumber(ARGV[9])), key)
redis.call('SADD', P .. 'owned:' .. owner, key)
redis.call('SADD', P .. 'owners', owner)
return 1
"""

# ARGV: P, owner, generation, handoff_id, side, from_state, to_state. Renews the lease.
_TRANSITION = """
local owner, gen, key = ARGV[2], ARGV[3], P .. 'bs:' .. ARGV[4] .. ':' .. ARGV[5]
if not fenced(owner, gen) then return 0 end
local s = redis.call('HMGET', key, 'owner', 'generation', 'state', 'lease_ms')
if s[1] ~= owner or s[2] ~= gen or s[3] ~= ARGV[6] then return 0 end
redis.call('HSET', key, 'state', ARGV[7])
redis.call('ZADD', P .. 'leases', 'XX', int(now_ms() + tonumber(s[4])), key)
return 1
"""

# ARGV: P, owner, generation, handoff_id   -> number of sets released (0, 1 or 2)
_RELEASE = """
local owner, gen = ARGV[2], ARGV[3]
if not fenced(owner, gen) then return 0 end
local n = 0
for _, side in ipairs({'dst', 'src'}) do
  local key = P .. 'bs:' .. ARGV[4] .. ':' .. side
  local s = redis.call('HMGET', key, 'owner', 'generation')
  if s[1] == owner and s[2] == gen then
    drop_set(key, owner)
    n = n + 1
  end
end
return n
"""

# ARGV: P   -> flat list owner1, handoff1, owner2, handoff2, ...
_REAP = """
local out = {}
local function reclaim(key, owner)
  local hid = drop_set(key, owner)
  out[#out + 1] = owner
  out[#out + 1] = hid
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now_ms())) do
  reclaim(key, redis.call('HGET', key, 'owner') or '')
end
for _, owner in ipairs(redis.call('SMEMBERS', P .. 'owners')) do
  local live = redis.call('HGET', P .. 'w:' .. owner, 'generation')
  for _, key in ipairs(redis.call('SMEMBERS', P .. 'owned:' .. owner)) do
    if redis.call('HGET', key, 'generation') ~= live then reclaim(key, owner) end
  end
end
for _, wid in ipairs(redis.call('SMEMBERS', P .. 'workers')) do
  if redis.call('EXISTS', P .. 'w:' .. wid) == 0 then redis.call('SREM', P .. 'workers', wid) end
end
return out
"""

# ARGV: P, with_sets ('0'|'1')   -> JSON {now_ms, workers: [...], sets: [...]}
_READ = """
local workers, sets = {}, {}
for _, wid in ipairs(redis.call('SMEMBERS', P .. 'workers')) do
  local w = hash_table(redis.call('HGETALL', P .. 'w:' .. wid))
  if w.generation then
    w.ttl_ms = redis.call('PTTL', P .. 'w:' .. wid)
    workers[#workers + 1] = w
  end
end
if ARGV[2] == '1' then
  local leases = redis.call('ZRANGE', P .. 'leases', 0, -1, 'WITHSCORES')
  for i = 1, #leases, 2 do
    local s = hash_table(redis.call('HGETALL', leases[i]))
    s.expires_ms = leases[i + 1]
    sets[#sets + 1] = s
  end
end
return cjson.encode({now_ms = int(now_ms()), workers = workers, sets = sets})
"""


class Ledger:
    """The mesh's control plane in Redis. Every method is async and one EVALSHA round trip
    (the first call of each script also loads it).

    `heartbeat_ttl_s`: a worker record expires this long after its last register/heartbeat;
    heartbeat at least three times per TTL. A worker whose heartbeat returns False has been
    fenced (its record expired or it re-registered elsewhere): its block sets are or will be
    reaped, so it must drop their requests and register again.
    """

    def __init__(
        self, redis_client: redis.Redis, prefix: str = "kvmesh:", heartbeat_ttl_s: float = 3.0
    ) -> None:
        self.prefix = prefix
        self.heartbeat_ttl_ms = _ms(heartbeat_ttl_s)
        register = redis_client.register_script
        self._register = register(_PRELUDE + _REGISTER)
        self._heartbeat = register(_PRELUDE + _HEARTBEAT)
        self._deregister = register(_PRELUDE + _DEREGISTER)
        self._reserve = register(_PRELUDE + _RESERVE)
        self._transition = register(_PRELUDE + _TRANSITION)
        self._release = register(_PRELUDE + _RELEASE)
        self._reap = register(_PRELUDE + _REAP)
        self._read = register(_PRELUDE + _READ)

    # ---- workers -------------------------------------------------------------------------

    async def register(self, info: WorkerInfo) -> int:
        """Register (or re-register) a worker; returns its new generation (1, 2, ...)."""
        record: list[Arg] = [
            item
            for f in fields(WorkerInfo)
            if f.name != "generation"
            for item in (f.name, str(getattr(info, f.name)))
        ]
        args: list[Arg] = [self.prefix, info.worker_id, self.heartbeat_ttl_ms, *record]
        return int(await self._register(args=args))

    async def heartbeat(
        self,
        worker_id: str,
        generation: int,
        free_blocks: int,
        total_blocks: int,
        queue_depth: int,
        running: int,
    ) -> bool:
        """Refresh the worker's record and capacity and renew the lease of all its block sets.

        False (nothing changed) if `generation` is not the worker's live generation.
        """
        args: list[Arg] = [
            self.prefix,
            worker_id,
            generation,
            self.heartbeat_ttl_ms,
            free_blocks,
            total_blocks,
            queue_depth,
            running,
        ]
        return bool(await self._heartbeat(args=args))

    async def deregister(self, worker_id: str, generation: int) -> bool:
        """Graceful leave: delete the worker's record and all its block sets (fenced)."""
        return bool(await self._deregister(args=[self.prefix, worker_id, generation]))

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        """Live workers (record not expired), optionally of one role, sorted by worker id."""
        state = await self._read_state(with_sets=False)
        found = [_worker_info(w) for w in state["workers"]]
        return sorted(
            (w for w in found if role is None or w.role == role), key=lambda w: w.worker_id
        )

    # ---- block sets ----------------------------------------------------------------------

    async def reserve(
        self,
        owner: str,
        generation: int,
        handoff_id: str,
        num_blocks: int,
        peer: str,
        lease_s: float,
        state: str = RESERVED,
    ) -> bool:
        """Create the owner's block set for a handoff, with a lease of `lease_s` seconds.

        `state` is `reserved` (the destination: decode reserves before prefill sends) or
        `sending` (the source: prefill records the blocks it is pushing). False if that side of
        the handoff already has a set (whoever created it) or the owner is fenced.
        """
        if state not in _INITIAL_STATES:
            raise ValueError(f"a block set starts as one of {_INITIAL_STATES}, not {state!r}")
        args: list[Arg] = [
            self.prefix,
            owner,
            generation,
            handoff_id,
            _SIDE[state],
            state,
            num_blocks,
            peer,
            _ms(lease_s),
        ]
        return bool(await self._reserve(args=args))

    async def transition(
        self, owner: str, generation: int, handoff_id: str, new_state: str
    ) -> bool:
        """Move the owner's set to `new_state`; the only edge is reserved -> owned (commit).

        Renews the lease. False (nothing changed) if the set is not in the state the edge
        starts from, belongs to someone else, or the owner is fenced.
        """
        if new_state not in _TRANSITIONS:
            raise ValueError(f"no transition leads to {new_state!r}")
        args: list[Arg] = [
            self.prefix,
            owner,
            generation,
            handoff_id,
            _SIDE[new_state],
            _TRANSITIONS[new_state],
            new_state,
        ]
        return bool(await self._transition(args=args))

    async def release(self, owner: str, generation: int, handoff_id: str) -> bool:
        """Delete the owner's set(s) of this handoff; False if it had none or is fenced."""
        return bool(await self._release(args=[self.prefix, owner, generation, handoff_id]))

    async def reap(self) -> list[tuple[str, str]]:
        """Reclaim sets whose lease expired or whose owner is gone/restarted; prune dead workers.

        Returns the (owner, handoff_id) reclaimed. One round trip; the work is linear in the
        number of live block sets, cheap to run every second.
        """
        flat = [_text(x) for x in await self._reap(args=[self.prefix])]
        return list(zip(flat[0::2], flat[1::2], strict=True))

    async def snapshot(self) -> dict[str, Any]:
        """Everything `kvmesh status` prints, read atomically.

        {"workers": [WorkerInfo fields + "ttl_s"],
         "block_sets": {owner: [{"handoff_id", "state", "blocks", "peer", "generation",
                                 "age_s", "lease_left_s"}]},
         "in_flight": [handoff ids with a set in state reserved or sending, sorted]}
        """
        state = await self._read_state(with_sets=True)
        now_ms = int(state["now_ms"])
        workers = [
            {**vars(_worker_info(w)), "ttl_s": int(w["ttl_ms"]) / 1000} for w in state["workers"]
        ]
        block_sets: dict[str, list[dict[str, Any]]] = {}
        for s in state["sets"]:
            block_sets.setdefault(s["owner"], []).append(_set_view(s, now_ms))
        in_flight = {s["handoff_id"] for s in state["sets"] if s["state"] != OWNED}
        return {
            "workers": sorted(workers, key=lambda w: w["worker_id"]),
            "block_sets": block_sets,
            "in_flight": sorted(in_flight),
        }

    async def _read_state(self, with_sets: bool) -> dict[str, Any]:
        raw = await self._read(args=[self.prefix, "1" if with_sets else "0"])
        state: dict[str, Any] = json.loads(raw)
        # cjson encodes an empty Lua table as {}, not [].
        for key in ("workers", "sets"):
            state[key] = state[key] or []
        return state


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _worker_info(record: dict[str, str]) -> WorkerInfo:
    return WorkerInfo(
        worker_id=record["worker_id"],
        role=record["role"],
        address=record["address"],
        kv_endpoint=record["kv_endpoint"],
        model=record["model"],
        generation=int(record["generation"]),
        free_blocks=int(record["free_blocks"]),
        total_blocks=int(record["total_blocks"]),
        queue_depth=int(record["queue_depth"]),
        running=int(record["running"]),
    )


def _set_view(record: dict[str, str], now_ms: int) -> dict[str, Any]:
    return {
        "handoff_id": record["handoff_id"],
        "state": record["state"],
        "blocks": int(record["blocks"]),
        "peer": record["peer"],
        "generation": int(record["generation"]),
        "age_s": (now_ms - int(record["created_ms"])) / 1000,
        "lease_left_s": (int(float(record["expires_ms"])) - now_ms) / 1000,
    }
