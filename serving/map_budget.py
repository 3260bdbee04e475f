"""The process's memory-map budget for compiled steps (Linux).

On the CPU every XLA executable keeps memory maps of its JIT code: about 290 per step of the bundled demo model
(25,800 maps after its 89 steps, `python benchmarks/memory_maps.py`), a code, a constants and a data region per
kernel. A process may hold at most vm.max_map_count maps (65530 by default); past it XLA's next compile fails and
the process can die in the unwinder while raising that error (seen in long test processes). So before each
compile the engine checks that one more step of the largest size seen so far still fits under a reserve of the
limit, and otherwise refuses that step with a MapLimitError that says what to change. A background warm-up treats
that as a failed step: the larger buckets that compiled keep serving its shapes. Accelerator executables map
little host code. The check costs one read of /proc/self/maps per compile (the count after one compile is the count
the next one checks; a read takes milliseconds at the demo's 26k maps) and is skipped where /proc is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.errors import UserError

__all__ = ["MapBudget", "MapLimitError", "count_maps", "max_map_count"]

RESERVE = 0.9  # of vm.max_map_count: threads, allocator arenas and later buffers need maps too


class MapLimitError(UserError):
    """Compiling one more step would take the process past its memory-map limit."""


def count_maps(pid: int | str = "self") -> int | None:
    """Memory maps process `pid` (default: this one) holds now; None where /proc/PID/maps cannot be read."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:
        return None


def max_map_count() -> int | None:
    """The kernel's per-process map limit (vm.max_map_count); None where it cannot be read."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


@dataclass
class MapBudget:
    """Checks each compile against `limit` (default: vm.max_map_count) with `reserve` kept free.

    Use: `check(label)` before a compile (raises MapLimitError), `record(before)` after it with check's count."""

    limit: int | None = field(default_factory=max_map_count)
    reserve: float = RESERVE
    largest_step: int = 0  # the most maps one compile added so far
    # Counted after the last compile: the next check's count (what other threads map in between is in the reserve).
    held: int | None = None

    def check(self, label: str) -> int | None:
        """Maps held (None: not measurable, nothing checked); raises MapLimitError if one more step as large as the
        largest so far would pass reserve x limit."""
        if self.limit is None:
            return None
        held = self.held if self.held is not None else count_maps()
        if held is None:
            return None
        allowed = int(self.limit * self.reserve)
        if held + self.largest_step > allowed:
            raise MapLimitError(
                f"compiling step {label} would pass this process's memory-map limit: {held} maps held, the largest "
                f"step so far added {self.largest_step}, {allowed} allowed ({self.reserve:.0%} of vm.max_map_count "
                f"{self.limit}; on the CPU each compiled step maps its JIT code). Compile fewer steps (fewer "
                f"--length-buckets / --decode-buckets, a smaller --max-batch) or raise the limit: "
                f"sysctl -w vm.max_map_count=262144"
            )
        return held

    def record(self, before: int | None) -> None:
        """After a compile: remember how many maps it added (before: what `check` returned)."""
        if before is None:
            return
        self.held = count_maps()
        if self.held is not None:
            self.largest_step = max(self.largest_step, self.held - before)
