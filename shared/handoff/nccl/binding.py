"""A small ctypes binding over libnccl.so.2: what a 2-rank KV handoff needs, nothing more.

    lib = load()                        # NcclUnavailable(reason) without NCCL or a CUDA device
    uid = lib.unique_id()               # 128 bytes, created by rank 0, sent to the peer
    comm = Communicator(lib, 2, uid, rank)
    comm.init()                         # blocks until both ranks joined
    with lib.group():                   # several sends/recvs, possibly on several communicators,
        comm.send(tensor, peer, stream) # launched as one batch
    comm.abort()                        # tears down, also from another thread while kernels hang
                                        # (during init(): once init returns)

Communicators are blocking (NCCL's default): a send or recv only enqueues a kernel once the
pair is connected, and `abort` is the one way out of a hung peer, as in PyTorch's watchdog.

Calls that can block (init, teardown, ncclGroupEnd, which launches and may connect) release the
GIL, as ctypes does. ncclGroupStart, and ncclSend/ncclRecv inside a group (where they only
record the operation), keep it: each release would let the process's other Python threads (the
engine's) run until they give the GIL back, so a burst of sends or recvs would pay one such
wait per call instead of one per group.

The library is found, in order, at: $KVMESH_NCCL_LIBRARY; the installed nvidia-nccl-cu13/cu12
package; the NCCL the process (torch) already mapped or torch's lib dir; ldconfig's cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

ENV_LIBRARY = "KVMESH_NCCL_LIBRARY"
UNIQUE_ID_BYTES = 128
_PACKAGES = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")
_UINT8 = 1  # ncclUint8: payloads are moved as raw bytes
_RESULTS = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
}
IN_PROGRESS = 7


class NcclUnavailable(RuntimeError):
    """NCCL cannot be used in this process; the message says why (library, GPU)."""


class NcclError(RuntimeError):
    """An NCCL call failed."""

    def __init__(self, call: str, code: int, text: str) -> None:
        super().__init__(f"{call} failed: {_RESULTS.get(code, code)}: {text}")
        self.code = code


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


# ---- finding the library -------------------------------------------------------------------


def _from_package() -> list[str]:
    found = []
    for dist in _PACKAGES:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        found += [str(f.locate()) for f in files if f.name.startswith("libnccl.so")]
    return found


def _from_torch() -> list[str]:
    found = []
    with contextlib.suppress(OSError):  # the copy torch already loaded, if any
        maps = Path("/proc/self/maps").read_text().splitlines()
        found += sorted({line.split()[-1] for line in maps if "libnccl.so" in line})
    found += sorted(str(p) for p in (Path(torch.__file__).parent / "lib").glob("libnccl.so*"))
    return found


def _from_ldconfig() -> list[str]:
    name = ctypes.util.find_library("nccl")
    return [name] if name else []


def candidates() -> list[tuple[str, str]]:
    """(where, path) of every libnccl found, in the order they are tried."""
    out: list[tuple[str, str]] = []
    if env := os.environ.get(ENV_LIBRARY):
        out.append((f"${ENV_LIBRARY}", env))
    out += [("nvidia-nccl package", p) for p in _from_package()]
    out += [("torch", p) for p in _from_torch()]
    out += [("ldconfig", p) for p in _from_ldconfig()]
    return out


def open_library() -> tuple[ctypes.CDLL, str]:
    """The first candidate that loads, and its path; NcclUnavailable listing what was tried."""
    errors = []
    for where, path in candidates():
        try:
            return ctypes.CDLL(path), path
        except OSError as exc:
            errors.append(f"{where} {path}: {exc}")
    tried = "; ".join(errors) or "nothing found"
    raise NcclUnavailable(
        f"libnccl.so.2 not found (set ${ENV_LIBRARY}, or install nvidia-nccl-cu13); tried: {tried}"
    )


# ---- the library ---------------------------------------------------------------------------


class Nccl:
    """The loaded library with typed signatures. Use `load()`, which caches one per process."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = lib
        self._held = ctypes.PyDLL(path)  # the same library; its calls keep the GIL
        self._grouped = threading.local()  # depth: how many group()s this thread is inside
        vp, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sigs: dict[str, list] = {
            "ncclGetVersion": [ctypes.POINTER(c_int)],
            "ncclGetUniqueId": [ctypes.POINTER(_UniqueId)],
            "ncclCommInitRank": [ctypes.POINTER(vp), c_int, _UniqueId, c_int],
            "ncclCommDestroy": [vp],
            "ncclCommAbort": [vp],
            "ncclCommGetAsyncError": [vp, ctypes.POINTER(c_int)],
            "ncclSend": [vp, c_size, c_int, c_int, vp, vp],
            "ncclRecv": [vp, c_size, c_int, c_int, vp, vp],
            "ncclGroupStart": [],
            "ncclGroupEnd": [],
        }
        for name, argtypes in sigs.items():
            for handle in (lib, self._held):
                fn = getattr(handle, name)
                fn.argtypes, fn.restype = argtypes, c_int
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [c_int], ctypes.c_char_p
        self._last_error = getattr(lib, "ncclGetLastError", None)  # NCCL >= 2.13
        if self._last_error is not None:
            self._last_error.argtypes, self._last_error.restype = [vp], ctypes.c_char_p

    def call(self, name: str, *args: object, hold_gil: bool = False) -> int:
        """Call `name` (keeping the GIL if hold_gil: only for calls that never block); NcclError
        unless it returns ncclSuccess (or ncclInProgress)."""
        code = getattr(self._held if hold_gil else self._lib, name)(*args)
        if code not in (0, IN_PROGRESS):
            raise NcclError(name, code, self.error_text(code))
        return int(code)

    def error_text(self, code: int) -> str:
        text = (self._lib.ncclGetErrorString(code) or b"").decode(errors="replace")
        last = self._last_error(None) if self._last_error is not None else b""
        last = (last or b"").decode(errors="replace")
        return f"{text} ({last})" if last else text

    def version(self) -> int:
        """NCCL's version code, e.g. 22805 for 2.28.5."""
        v = ctypes.c_int()
        self.call("ncclGetVersion", ctypes.byref(v))
        return v.value

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self.call("ncclGetUniqueId", ctypes.byref(uid))
        return bytes(ctypes.string_at(ctypes.addressof(uid), UNIQUE_ID_BYTES))

    @property
    def in_group(self) -> bool:
        """Whether this thread is inside group(): a send or recv only records itself there."""
        return getattr(self._grouped, "depth", 0) > 0

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """ncclGroupStart/End: the sends and recvs issued inside launch together."""
        self.call("ncclGroupStart", hold_gil=True)
        self._grouped.depth = getattr(self._grouped, "depth", 0) + 1
        try:
            yield
        finally:
            self._grouped.depth -= 1
            self.call("ncclGroupEnd")


class Communicator:
    """One rank of an NCCL communicator. Thread-safe teardown: abort() may run while this
    communicator's kernels wait on a dead peer, and while another thread is blocked in init().

    NCCL is never asked to tear down a communicator whose init has not returned: a blocking
    ncclCommInitRank that fails frees the communicator itself (and the pointer it wrote early),
    so an ncclCommAbort racing it frees the same memory twice (heap corruption). An abort()
    during init() only marks the communicator closed; init() tears it down once NCCL returns,
    or leaves it alone if the init failed. An init whose peer never joins stays blocked in its
    thread (NCCL's bootstrap waits without a timeout): its caller gives up on it instead."""

    def __init__(self, lib: Nccl, nranks: int, unique_id: bytes, rank: int) -> None:
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {len(unique_id)}")
        self.lib, self.nranks, self.rank = lib, nranks, rank
        self._uid = unique_id
        self._handle = ctypes.c_void_p()  # set once init() succeeded
        self._lock = threading.Lock()  # guards closed, _initializing and _deferred
        self.closed = False
        self._initializing = False
        self._deferred = ""  # the teardown asked for during init(), which init() runs

    def init(self) -> None:
        """ncclCommInitRank on the current CUDA device; blocks until every rank joined.
        NcclError if it failed, or if the communicator was torn down meanwhile."""
        with self._lock:
            if self.closed or self._initializing or self._handle.value:
                raise NcclError("ncclCommInitRank", 5, "communicator torn down or initialized")
            self._initializing = True
        uid = _UniqueId()
        ctypes.memmove(ctypes.addressof(uid), self._uid, UNIQUE_ID_BYTES)
        handle = ctypes.c_void_p()  # NCCL's to write until it returns (and free, if it fails)
        try:
            self.lib.call("ncclCommInitRank", ctypes.byref(handle), self.nranks, uid, self.rank)
        except BaseException:
            with self._lock:
                self._initializing, self.closed = False, True  # NCCL freed it: nothing to free
            raise
        with self._lock:
            self._initializing, self._handle = False, handle
            deferred = self._deferred
        if deferred:
            self.lib.call(deferred, handle)
            raise NcclError("ncclCommInitRank", 5, "communicator torn down during its init")

    @property
    def handle(self) -> int | None:
        return self._handle.value

    def send(self, data: torch.Tensor, peer: int, stream: torch.cuda.Stream) -> None:
        """Enqueue sending `data`'s bytes (contiguous, on this rank's device) on `stream`."""
        self.lib.call("ncclSend", *self._p2p_args(data, peer, stream), hold_gil=self.lib.in_group)

    def recv(self, data: torch.Tensor, peer: int, stream: torch.cuda.Stream) -> None:
        """Enqueue receiving into `data`'s bytes (contiguous, on this rank's device)."""
        self.lib.call("ncclRecv", *self._p2p_args(data, peer, stream), hold_gil=self.lib.in_group)

    def _p2p_args(self, data: torch.Tensor, peer: int, stream: torch.cuda.Stream) -> tuple:
        if self.closed or not self._handle.value:
            raise NcclError("p2p", 5, "communicator is not initialized or was torn down")
        assert data.is_cuda and data.is_contiguous()
        nbytes = data.numel() * data.element_size()
        return (data.data_ptr(), nbytes, _UINT8, peer, self._handle, stream.cuda_stream)

    def async_error(self) -> int:
        """ncclCommGetAsyncError: 0 while healthy (a remote or internal error otherwise)."""
        if self.closed or not self._handle.value:
            return 0
        code = ctypes.c_int()
        self.lib.call("ncclCommGetAsyncError", self._handle, ctypes.byref(code))
        return code.value

    def check(self) -> None:
        """Raise NcclError if NCCL reported an asynchronous error on this communicator."""
        if (code := self.async_error()) not in (0, IN_PROGRESS):
            raise NcclError("ncclCommGetAsyncError", code, self.lib.error_text(code))

    def abort(self) -> None:
        """ncclCommAbort: stop this communicator's kernels and free it. Idempotent."""
        self._teardown("ncclCommAbort")

    def destroy(self) -> None:
        """ncclCommDestroy: free it after its operations complete. Idempotent."""
        self._teardown("ncclCommDestroy")

    def _teardown(self, call: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._initializing:
                self._deferred = call  # init() runs it when NCCL returns
                return
            handle = self._handle.value
        if handle:
            self.lib.call(call, ctypes.c_void_p(handle))


# ---- loading -------------------------------------------------------------------------------

_loaded: Nccl | None = None
_load_lock = threading.Lock()


def load() -> Nccl:
    """The process's NCCL; NcclUnavailable with the reason if it or a CUDA device is missing."""
    global _loaded
    with _load_lock:
        if _loaded is not None:
            return _loaded
        reasons = []
        if not torch.cuda.is_available():
            reasons.append(
                "no CUDA device: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
        try:
            lib, path = open_library()
        except NcclUnavailable as exc:
            reasons.append(str(exc))
        if reasons:
            raise NcclUnavailable("NCCL unavailable: " + "; ".join(reasons))
        _loaded = Nccl(lib, path)
        return _loaded


def unavailable_reason() -> str:
    """'' if NCCL can be used here, else why not."""
    try:
        load()
    except (NcclUnavailable, AttributeError, OSError) as exc:
        return str(exc)
    return ""
