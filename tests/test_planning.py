"""Planning: emulator levels by memory budget, and which widths a device may train at."""

from __future__ import annotations

import pytest

from strategies.planning import Assignment, assign_levels

NEED = {1.0: 90.0, 0.5: 50.0, 0.25: 40.0}


def test_case_1_takes_the_highest_level_that_fits() -> None:
    out = assign_levels(1, {1: 100.0, 2: 60.0, 3: 10.0}, [1.0, 0.5, 0.25], 0.5, NEED.__getitem__)
    assert out[1] == Assignment(1.0) and out[2] == Assignment(0.5)
    assert out[3].level is None
    assert (
        out[3].reason
        == "memory budget 10 MB < 40 MB needed by the smallest allowed emulator (keep 0.25)"
    )


def test_case_2_shares_one_level_and_case_3_uses_the_full_model() -> None:
    out = assign_levels(2, {1: 100.0, 2: 45.0}, [1.0, 0.5, 0.25], 0.5, NEED.__getitem__)
    assert out[1] == Assignment(0.5) and out[2].level is None and "keep 0.5" in out[2].reason
    out = assign_levels(3, {1: 1.0}, [0.5], 0.5, NEED.__getitem__)
    assert out[1] == Assignment(1.0)


@pytest.mark.parametrize("budget", [39.9, 40.0])
def test_budget_boundary_is_inclusive(budget: float) -> None:
    out = assign_levels(1, {1: budget}, [0.25], 0.5, NEED.__getitem__)
    assert (out[1].level == 0.25) is (budget >= 40.0)


def test_bf16_only_where_native() -> None:
    from fedpeat.config import DeviceProfile
    from strategies.planning import allowed_bits, compute_bits

    native, emulated = DeviceProfile(bf16=True), DeviceProfile(bf16=False)
    assert allowed_bits([4, 8, 16, 32], native) == [4, 8, 16, 32]
    assert allowed_bits([4, 8, 16, 32], emulated) == [4, 8, 32]
    assert [compute_bits(b, native, 32) for b in (4, 8, 16, 32)] == [16, 16, 16, 32]
    assert [compute_bits(b, emulated, 32) for b in (4, 8, 32)] == [32, 32, 32]
