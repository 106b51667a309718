"""Test-wide setup.

TRITON_INTERPRET must be set before any kernel module is imported (Triton reads it when a kernel
is decorated), so it is set here, at collection time, for CPU runs. GPU tests live in tests/gpu
and are run on a GPU machine without it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
