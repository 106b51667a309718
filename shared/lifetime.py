"""Child processes that do not outlive their parent (Linux), even when it is SIGKILLed.

Either way asks the kernel for SIGTERM when the parent dies: `die_with_parent` as a Popen
preexec_fn (for any program), or `exit_with_parent(pid)`, called by a kvmesh child first thing.
The second keeps Python out of the time between fork and exec: with a preexec_fn, subprocess
forks rather than vforks and runs the function in the child, and in a parent whose gRPC threads
are busy that child can block on a lock a vanished thread held (gRPC logs "Other threads are
currently calling into gRPC, skipping fork() handlers" then).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A Popen preexec_fn: deliver SIGTERM to this child when its parent dies (no-op off Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def exit_with_parent(parent_pid: int) -> None:
    """SIGTERM to this process when process `parent_pid`, its parent, dies; at once if it
    already has (the kernel's request covers only a living parent)."""
    die_with_parent()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
