"""Cost model and level assignment against values worked out by hand."""

from __future__ import annotations

import pytest

from fedpeat.cost import ModelShape, activation_bytes, logits_bytes, training_memory_bytes
from strategies.assign import Assignment, assign_levels

SHAPE = ModelShape(params=1000, layers=2, hidden=4, heads=2, vocab=10)


def test_memory_estimate_by_hand() -> None:
    # activations: 2 layers * (1*2*4) tokens*hidden * (34 + 5*2*2/4 = 39) * 4 bytes / 2 = 1248
    assert activation_bytes(SHAPE, batch=1, seq=2) == 1248
    # logits: 3 * 1 * 2 * 10 * 4 bytes = 240
    assert logits_bytes(SHAPE, batch=1, seq=2) == 240
    # weights 1000 * 4 + adapter 100 * 16 + 1248 + 240
    assert training_memory_bytes(SHAPE, 100, batch=1, seq=2) == 7088
    # 4-bit frozen weights: 1000 * 0.5 bytes
    assert training_memory_bytes(SHAPE, 100, batch=1, seq=2, bits=4) == 3588
    # fp16 activations halve that term
    assert activation_bytes(SHAPE, batch=1, seq=2, act_bytes=2) == 624


def test_fewer_layers_need_less_memory() -> None:
    smaller = ModelShape(params=800, layers=1, hidden=4, heads=2, vocab=10)
    assert training_memory_bytes(smaller, 100, 4, 8) < training_memory_bytes(SHAPE, 100, 4, 8)


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
