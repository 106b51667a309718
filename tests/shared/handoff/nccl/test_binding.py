"""The ctypes binding of NCCL on a CPU host: it says clearly why it cannot run (no GPU, no library,
which one it looked for) and checks what it is given before calling NCCL."""

from __future__ import annotations

import pytest
import torch

from kvmesh.shared.handoff.nccl import binding as nccl

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


@needs_no_cuda
def test_load_without_a_gpu_says_why() -> None:
    with pytest.raises(nccl.NcclUnavailable, match="no CUDA device"):
        nccl.load()
    assert "no CUDA device" in nccl.unavailable_reason()


def test_a_configured_library_that_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nccl.ENV_LIBRARY, "/nowhere/libnccl.so.2")
    assert nccl.candidates()[0] == ("$KVMESH_NCCL_LIBRARY", "/nowhere/libnccl.so.2")
    monkeypatch.setattr(nccl, "_from_package", lambda: [])
    monkeypatch.setattr(nccl, "_from_torch", lambda: [])
    monkeypatch.setattr(nccl, "_from_ldconfig", lambda: [])
    with pytest.raises(nccl.NcclUnavailable, match="/nowhere/libnccl.so.2"):
        nccl.open_library()


def test_no_library_anywhere_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(nccl.ENV_LIBRARY, raising=False)
    for finder in ("_from_package", "_from_torch", "_from_ldconfig"):
        monkeypatch.setattr(nccl, finder, lambda: [])
    with pytest.raises(nccl.NcclUnavailable, match="nvidia-nccl-cu13.*nothing found"):
        nccl.open_library()


def test_a_unique_id_has_128_bytes() -> None:
    with pytest.raises(ValueError, match="128 bytes"):
        nccl.Communicator(None, 2, b"short", 0)  # type: ignore[arg-type]
