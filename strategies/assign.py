"""Which emulator level each device gets, before a controller exists: pure functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    """A device's level for this round, or why it is skipped."""

    level: float | None
    """Keep ratio of the emulator; None with a reason: skipped. Case 3 uses 1.0, no emulator."""
    reason: str = ""


def assign_levels(
    case: int,
    memory_mb: Mapping[int, float],
    levels: list[float],
    shared_level: float,
    need_mb: Callable[[float], float],
) -> dict[int, Assignment]:
    """Case 1: the highest level whose estimated training memory fits the device's budget.
    Case 2: the shared level for every device that fits it. Case 3: the full model for all.

    `memory_mb` maps node id -> budget; `need_mb(level)` is the cost model's estimate.
    """
    out: dict[int, Assignment] = {}
    for node, budget in memory_mb.items():
        if case == 3:
            out[node] = Assignment(1.0)
            continue
        candidates = sorted(levels, reverse=True) if case == 1 else [shared_level]
        fitting = [lv for lv in candidates if need_mb(lv) <= budget]
        if fitting:
            out[node] = Assignment(fitting[0])
        else:
            smallest = min(candidates)
            out[node] = Assignment(
                None,
                f"memory budget {budget:.0f} MB < {need_mb(smallest):.0f} MB needed "
                f"by the smallest allowed emulator (keep {smallest})",
            )
    return out
