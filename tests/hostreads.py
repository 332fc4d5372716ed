"""Test helpers that check a piece of code never reads tensor values back to the host (``.item()``, ``float(t)``,
``.tolist()``, ``.cpu()``, ...). On a GPU every such read waits for all queued kernels; one per sampling step would
leave the GPU idle while Python catches up. (Moved here from ``ddimctl.perf``: only the tests use them.)"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Tensor methods that copy values to the host (and so wait for the device): none may run inside a sampling loop.
HOST_READS = frozenset({"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"})


class _HostReadRecorder(torch.overrides.TorchFunctionMode):
    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_reads() -> Iterator[list[str]]:
    """Within the block, record the name of every tensor host read (see :data:`HOST_READS`), on any device.

        with record_host_reads() as reads:
            sample(denoiser, x, plan)
        assert reads == []

    Works on the CPU, where such reads cost nothing but would each be a sync on a GPU.
    """
    seen: list[str] = []
    with _HostReadRecorder(seen):
        yield seen


@contextlib.contextmanager
def cuda_sync_check(mode: str = "error") -> Iterator[bool]:
    """Within the block, make every synchronising CUDA call raise (``mode="error"``) or warn (``"warn"``), via
    ``torch.cuda.set_sync_debug_mode``; yields whether the check is active (False without CUDA)."""
    if not torch.cuda.is_available():
        yield False
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
