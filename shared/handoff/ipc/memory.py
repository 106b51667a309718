"""The receiver's KV cache, mapped by the sender's process: how the receiver describes it (a
JSON-safe dict, sent in the MAP frame) and how the sender maps it.

    kind "cuda"  CUDA IPC: torch's handle of the cache's allocation (storage._share_cuda_), opened
                 in the sender with rebuild_cuda_tensor on the card the receiver names by UUID:
                 the same card, or another one this process sees with peer access
    kind "file"  a CPU cache in a memory file (shared_memory): the sender maps
                 /proc/<pid>/fd/<fd> after checking it is the same file (device, inode)

Either way the sender gets a tensor of the receiver's shape, strides and dtype whose writes land
in the receiver's cache.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import torch

from kvmesh.shared.engine.shared_memory import shared_file
from kvmesh.shared.handoff.locality import device_id


class MapError(RuntimeError):
    """The cache cannot be exported here, or mapped there; the message says why."""


def unexportable(cache: torch.Tensor) -> str:
    """'' if `cache` can be described for another process, else why not."""
    if cache.device.type == "cuda" or shared_file(cache) is not None:
        return ""
    return "the KV cache is not in shared memory (allocate_kv_cache(shared=True))"


def describe(cache: torch.Tensor) -> dict[str, Any]:
    """How another process of this host maps `cache` (MapError if it cannot)."""
    layout = {
        "shape": list(cache.shape), "stride": list(cache.stride()),
        "offset": cache.storage_offset(), "dtype": str(cache.dtype).removeprefix("torch."),
    }  # fmt: skip
    if cache.device.type == "cuda":
        with torch.cuda.device(cache.device):
            dev, handle, size, offset, ref, ref_offset, event, sync = (
                cache.untyped_storage()._share_cuda_()  # type: ignore[attr-defined]
            )
        return layout | {
            "kind": "cuda", "device": device_id(cache.device), "handle": _b64(handle),
            "size": size, "storage_offset": offset, "ref": _b64(ref), "ref_offset": ref_offset,
            "event": _b64(event), "event_sync": bool(sync),
        }  # fmt: skip
    file = shared_file(cache)
    if file is None:
        raise MapError(unexportable(cache))
    return layout | {
        "kind": "file", "path": file.path, "nbytes": file.nbytes,
        "st_dev": file.st_dev, "st_ino": file.st_ino,
    }  # fmt: skip


def open_mapping(desc: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The receiver's cache as a tensor of this process (sender on `device`); MapError if this
    process cannot map it."""
    try:
        dtype = getattr(torch, str(desc["dtype"]))
        if not isinstance(dtype, torch.dtype):
            raise MapError(f"unknown dtype {desc['dtype']!r}")
        kind = desc["kind"]
        if kind == "file":
            return _open_file(desc, device, dtype)
        if kind == "cuda":
            return _open_cuda(desc, device, dtype)
        raise MapError(f"unknown mapping kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MapError(f"bad mapping description: {exc!r}") from None


def _open_file(desc: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type != "cpu":
        raise MapError(f"a CPU cache is written from a CPU process (this one is on {device})")
    path = str(desc["path"])
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise MapError(f"cannot open the receiver's cache file: {exc}") from None
    if (stat.st_dev, stat.st_ino) != (desc["st_dev"], desc["st_ino"]):
        raise MapError(f"{path} is not the receiver's cache file (another process namespace?)")
    nbytes = int(desc["nbytes"])
    if stat.st_size < nbytes:
        raise MapError(f"the cache file has {stat.st_size} bytes, not {nbytes}")
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    # torch's stub types from_file as _StorageBase's (a union); on UntypedStorage it is one
    return _view(storage, desc, dtype, torch.device("cpu"))  # type: ignore[arg-type]


def _open_cuda(desc: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device.type != "cuda":
        raise MapError(f"a CUDA cache is written from a CUDA process (this one is on {device})")
    local = _local_index(str(desc["device"]))
    mine = device.index if device.index is not None else torch.cuda.current_device()
    if local != mine and not torch.cuda.can_device_access_peer(mine, local):
        raise MapError(f"cuda:{mine} has no peer access to the receiver's card cuda:{local}")
    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(desc["shape"]), tuple(desc["stride"]), int(desc["offset"]),
            torch.UntypedStorage, dtype, local, _bytes(desc["handle"]), int(desc["size"]),
            int(desc["storage_offset"]), False, _bytes(desc["ref"]), int(desc["ref_offset"]),
            _bytes(desc["event"]), bool(desc["event_sync"]),
        )  # fmt: skip
    except RuntimeError as exc:  # cudaIpcOpenMemHandle failed
        raise MapError(f"cannot open the receiver's CUDA memory: {exc}") from None


def _local_index(uuid: str) -> int:
    """This process's index of the card with this UUID (MapError if it does not see it)."""
    for index in range(torch.cuda.device_count()):
        if device_id(torch.device("cuda", index)) == uuid:
            return index
    raise MapError(f"the receiver's card {uuid} is not visible to this process")


def _view(
    storage: torch.UntypedStorage, desc: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    shape, stride, offset = tuple(desc["shape"]), tuple(desc["stride"]), int(desc["offset"])
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if min(shape, default=1) < 1 or (last + 1) * dtype.itemsize > storage.nbytes():
        raise MapError(f"a {list(shape)} cache does not fit the mapped {storage.nbytes()} bytes")
    return torch.empty(0, dtype=dtype, device=device).set_(storage, offset, shape, stride)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
