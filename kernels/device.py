"""What the kernels' launch heuristics ask of the device: how many programs fill it, and which
architecture it is."""

import functools

import torch


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device. The interpreter (CPU) counts 4: few programs, yet still
    several of a kind (splits to merge, chunks to reduce), so the CPU tests run those paths."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, e.g. (9, 0) for an H100."""
    return torch.cuda.get_device_capability(device)
