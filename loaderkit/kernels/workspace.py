"""The workspace: CPU buffers reused for the decoded copies cast rules hand their kernels, keyed
by shape and dtype, so a forward allocates nothing once warm."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Pool:
    """Reused CPU buffers for decoded copies, keyed by (shape, dtype)."""

    free: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self.lock:
            stack = self.free.get((shape, dtype))
            if stack:
                return stack.pop()
        with torch.inference_mode(False):  # a normal tensor can be written in and out of inference mode
            return torch.empty(shape, dtype=dtype)

    def give(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


POOL = Pool()


def workspace() -> dict[tuple[tuple[int, ...], torch.dtype], int]:
    """The CPU buffers kept for reuse, as ``{(shape, dtype): count}``."""
    with POOL.lock:
        return {k: len(v) for k, v in POOL.free.items() if v}


def release_workspace() -> None:
    """Free the CPU buffers reused for decoded copies (they are re-made on the next forward)."""
    POOL.clear()
