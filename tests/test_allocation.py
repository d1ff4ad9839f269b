"""The allocation program against values worked out by hand."""

from __future__ import annotations

import pytest

from fedpeat.allocation import Allocation, Option, allocate, infeasible_reason, option_value


def opt(value: float, memory: float = 10.0, time: float = 1.0, up: float = 1.0, rank: int = 4):
    return Option(rank, 2, 16, 1.0, memory, time, up, value)


def test_option_value_by_hand() -> None:
    assert option_value(0.5, 8, 0.9, 100) == pytest.approx(360.0)


def test_each_device_gets_its_best_plan_that_fits_and_a_hopeless_one_is_skipped() -> None:
    menus = {
        1: [opt(2, memory=50), opt(4, memory=120), opt(3, memory=90)],
        2: [opt(1, memory=50, rank=2), opt(5, memory=60)],
    }
    out = allocate(menus, {1: 100.0, 2: 10.0})
    assert out[1] == Allocation(menus[1][2])  # value 3: the best within 100 MB
    assert out[2].option is None
    assert out[2].reason == (
        "memory budget 10 MB < 50 MB needed by the smallest plan "
        "(rank 2, batch 2, 16-bit, modules x1)"
    )


def test_the_upload_budget_couples_devices() -> None:
    # Upload 4 MB: small+small = 2, C big + D small = 3.5, C small + D big = 3.6, big+big
    # needs 6 MB. Best: C small, D big.
    menus = {
        3: [opt(1.0, up=1), opt(2.5, up=3)],
        4: [opt(1.0, up=1), opt(2.6, up=3)],
    }
    out = allocate(menus, {3: 100.0, 4: 100.0}, upload_mb=4.0)
    assert out[3].option == menus[3][0] and out[4].option == menus[4][1]
    assert {n: a.option for n, a in allocate(menus, {3: 100.0, 4: 100.0}, upload_mb=6).items()} == {
        3: menus[3][1],
        4: menus[4][1],
    }
    # Nothing fits 0.5 MB: both left out, and the reason says so.
    for alloc in allocate(menus, {3: 100.0, 4: 100.0}, upload_mb=0.5).values():
        assert alloc.option is None and "upload budget of 0.5 MB" in alloc.reason


def test_the_deadline_trades_value_for_time() -> None:
    menus = {1: [opt(1, time=5), opt(9, time=20)], 2: [opt(9, time=12)]}
    out = allocate(menus, {1: 100.0, 2: 100.0}, deadline_s=10.0)
    assert out[1].option == menus[1][0]
    assert out[2].option is None and out[2].reason.startswith("deadline 10.0 s < 12.0 s")


def test_memory_and_deadline_that_only_fail_together_are_named() -> None:
    menu = [opt(1, memory=200, time=1), opt(1, memory=10, time=50)]
    assert infeasible_reason(menu, 100.0, 10.0) == (
        "no plan fits the memory budget and the deadline together"
    )
    assert infeasible_reason(menu, 1000.0, 0.0) == ""


def test_limits_derived_from_the_fleet_by_hand() -> None:
    from fedpeat.allocation import fleet_limits

    menus = {
        # fast device: plans of 2 s (1 MB up) and 9 s (4 MB up); a 30 s plan it cannot hold
        1: [opt(1, time=2, up=1), opt(5, time=9, up=4), opt(9, memory=500, time=30, up=8)],
        # straggler: its fastest plan takes 6 s, its richest 12 s (3 MB up)
        2: [opt(1, time=6, up=1), opt(3, time=12, up=3)],
        3: [opt(1, memory=500)],  # holds nothing: not counted
    }
    budgets = {1: 100.0, 2: 100.0, 3: 100.0}
    # Deadline: the slowest device's fastest plan, max(2, 6) = 6 s. Upload: half of the largest
    # plans that fit, 0.5 * (4 + 3) = 3.5 MB.
    assert fleet_limits(menus, budgets, 0.5, True) == (6.0, 3.5)
    assert fleet_limits(menus, budgets, 0.0, False) == (0.0, 0.0)
    assert fleet_limits({3: menus[3]}, budgets, 0.5, True) == (0.0, 0.0)
    # Under those limits the program is joint: the fast device's 9 s plan is out (deadline), the
    # straggler keeps its 6 s one, and the fast one's 2 s plan fits the 3.5 MB beside it.
    deadline, upload = fleet_limits(menus, budgets, 0.5, True)
    out = allocate(menus, budgets, deadline, upload)
    assert out[1].option == menus[1][0] and out[2].option == menus[2][0]
