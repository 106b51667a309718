"""Programmatic dependent launch (PDL) for the decode step's kernels (sm_90 and later).

A decode step is a couple of hundred short kernels back to back in a CUDA graph; between two the
card drains one grid and only then launches the next, a gap of a microsecond or two each. With
PDL a kernel is launched with `launch_pdl=True` and starts by `pdl_enter`:

    griddepcontrol.wait                  wait until the previous grid has finished and its
                                         writes are visible (every program, before any load)
    griddepcontrol.launch_dependents     let the next grid's programs be launched now

so the next kernel's launch overlaps this one's work, and its programs wait on chip for this
one to finish. Every program waits before it reads anything or returns, so a kernel's completion
still implies its predecessor's, all the way back (data from two kernels ago is safe too).
Kernels launched without the attribute (torch's, cuBLAS's) keep the plain stream order.
Work that reads nothing an earlier kernel writes may come before the wait: the skinny linear
(kernels/linear.py) prefetches the first lines of its weight rows into L2 there, so a projection's
weight starts streaming while the kernel before it drains.

KVMESH_PDL=0 turns it off (for A/B timings); off on CPU, under the interpreter and before sm_90.
"""

import functools
import os

import torch
import triton
import triton.language as tl

_HAS_GDC = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


@triton.jit
def pdl_enter(ENABLED: tl.constexpr):
    """A PDL kernel's first statement: wait for the previous grid, then release the next."""
    if ENABLED:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=8)
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL."""
    return (
        device.type == "cuda"
        and _HAS_GDC
        and os.environ.get("TRITON_INTERPRET") != "1"
        and os.environ.get("KVMESH_PDL", "1") != "0"
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def pdl_args(device: torch.device) -> dict:
    """Launch kwargs for a kernel that calls `pdl_enter(PDL)`: its PDL constexpr, and the
    launch attribute where the device supports it."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
