"""CPU tensors that another process of this host can map: an anonymous memory file (memfd) per
tensor, reached by others at /proc/<pid>/fd/<fd> while this process lives.

No name to clean up: the memory goes with the last process that maps it, also when this one is
killed. (A decode engine's KV cache lives here so that a prefill process of the same host can
write handed-off KV straight into its blocks: handoff/ipc.)
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedFile:
    pid: int  # the process holding `fd`
    fd: int
    nbytes: int  # the file's size
    st_dev: int  # the file's identity: a mapper checks it opened this file
    st_ino: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


_lock = threading.Lock()
_files: dict[int, SharedFile] = {}  # storage address -> its file


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) in a memory file of its own (OSError where memfd is missing)."""
    nbytes = math.prod(shape) * dtype.itemsize
    fd = os.memfd_create("kvmesh-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)  # reads as zeros
        numel = math.prod(shape)
        tensor = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype)
    except BaseException:
        os.close(fd)
        raise
    stat = os.fstat(fd)
    address = tensor.untyped_storage().data_ptr()
    with _lock:
        _files[address] = SharedFile(os.getpid(), fd, nbytes, stat.st_dev, stat.st_ino)
    weakref.finalize(tensor, _release, address, fd)
    return tensor.view(shape)


def shared_file(tensor: torch.Tensor) -> SharedFile | None:
    """The memory file of a tensor shared_zeros made (or a view of it), else None."""
    if tensor.device.type != "cpu":
        return None
    with _lock:
        return _files.get(tensor.untyped_storage().data_ptr())


def _release(address: int, fd: int) -> None:
    with _lock:
        _files.pop(address, None)
    os.close(fd)
