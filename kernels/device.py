"""The device facts the kernels, the benchmarks and the trainer decide by, each in one place.

- ``interpreter_enabled``: Triton kernels run on CPU tensors (``TRITON_INTERPRET=1``), read at call
  time (tests switch it).
- ``capability`` / ``name``: a CUDA device's compute capability and name, asked of the driver once
  per device index (None / ``"cpu"``-like answers for other devices).
- ``supports_bf16``: the bf16 rule, compute capability 8.0+ (below it bf16 is emulated and Triton
  cannot build it); CPUs (capability None) run bf16.
- ``fused_kernel_supported``: the fused attention kernel's rule, Triton importable and sm80+.
- ``table_key``: the name a GPU's tuned tile table is filed under (``kernels/tiles/<slug>.json``).
"""

from __future__ import annotations

import functools
import os

import torch

SM80 = (8, 0)  # Ampere: bf16 and TF32 tensor cores, cp.async; the fused kernel's minimum


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device, the current one for a bare ``cuda``."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


@functools.cache
def _name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def capability(device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device (asked once per index), None for any other device."""
    device = torch.device(device)
    return _capability(cuda_index(device)) if device.type == "cuda" else None


def name(device) -> str:
    """A CUDA device's name as the driver gives it (asked once per index); for a CPU, what runs the
    kernels there: ``CPU (Triton interpreter)``."""
    device = torch.device(device)
    return _name(cuda_index(device)) if device.type == "cuda" else "CPU (Triton interpreter)"


def supports_bf16(capability: tuple[int, int] | None) -> bool:
    """Whether bf16 runs natively: compute capability 8.0 or newer, or a CPU (``capability`` None)."""
    return capability is None or tuple(capability) >= SM80


def supports_tf32(capability: tuple[int, int] | None) -> bool:
    """Whether the tensor cores take TF32 (sm80+); None (the interpreter) does not."""
    return capability is not None and tuple(capability) >= SM80


@functools.cache
def _fused_kernel_supported(index: int) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _capability(index) >= SM80


def fused_kernel_supported(device: torch.device) -> bool:
    """Whether ``backend="auto"`` may run the fused Triton kernel on ``device``: a CUDA GPU of sm80+
    with Triton importable, not under the interpreter. Asked once per device, not on every call."""
    if device.type != "cuda" or interpreter_enabled():
        return False
    return _fused_kernel_supported(cuda_index(device))


def table_key(device) -> str:
    """The device name the tuned tile tables are keyed by (``plans.table_path`` turns it into a file)."""
    return name(device)
