"""The engine's own account of the device memory it holds.

Why: on the CPU there is no ``torch.cuda.max_memory_allocated``, yet the promise that device
memory is bounded by the plan (not by depth) must be testable there too. The engine records
every buffer it keeps across unit boundaries (slots, hidden states, offloaded inputs brought
back, kept activations, gradients in flight) when it takes it and when it lets it go. Temporaries
inside one unit's compute are the fixed workspace and are not recorded here; on CUDA the
allocator's peak covers them.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DeviceLedger"]


class DeviceLedger:
    def __init__(self) -> None:
        self._held: dict[object, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def hold(self, key: object, nbytes: int) -> None:
        assert key not in self._held, f"{key!r} is already held"
        self._held[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def release(self, key: object) -> None:
        self.current_bytes -= self._held.pop(key)

    def release_all_but(self, keep: Callable[[object], bool]) -> None:
        """Let go of every entry whose key ``keep`` refuses (after a step that failed midway)."""
        for key in [k for k in self._held if not keep(k)]:
            self.release(key)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
