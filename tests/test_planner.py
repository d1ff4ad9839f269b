"""FedPipe planning maths against values worked out by hand: cost terms, the allocation program,
the module knapsack, and heterogeneous-rank shares and averages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeat.allocation import Allocation, Option, allocate, infeasible_reason, option_value
from fedpeat.cost import (
    ModelShape,
    compute_s,
    path_loss_db,
    rate_bps,
    training_memory_bytes,
    transmission_s,
    weight_bytes,
)
from fedpeat.importance import choose_modules, lora_params, top_share
from strategies.aggregation import device_share, pad_rank, partial_average

# ----------------------------------------------------------------------------- cost model

SHAPE = ModelShape(
    params=1000, layers=2, hidden=4, heads=2, vocab=10, linear_params=800, max_linear=100
)


def test_quantized_weight_bytes_by_hand() -> None:
    # NF4: 800 linear weights * 4.5 bits / 8 = 450; 200 others * 2 bytes = 400; one 100-weight
    # matrix dequantized to bf16 = 200.
    assert weight_bytes(SHAPE, 4, compute_bits=16) == 1050
    # int8: 800 * 1 + 400 + 200
    assert weight_bytes(SHAPE, 8, compute_bits=16) == 1400
    # 16 and 32 bits: every weight at that width
    assert weight_bytes(SHAPE, 16, compute_bits=16) == 2000
    assert weight_bytes(SHAPE, 32) == 4000


def test_training_memory_uses_the_compute_width_for_the_unquantized_rest() -> None:
    # weights 1050 + adapter 100 * 16 + activations (1248 at 4 bytes -> 624 at 2) + logits 240
    assert training_memory_bytes(SHAPE, 100, 1, 2, bits=4, act_bytes=2, compute_bits=16) == (
        1050 + 1600 + 624 + 240
    )


def test_shannon_rate_by_hand() -> None:
    # 100 m: path loss 128.1 + 37.6 * log10(0.1) = 90.5 dB. SNR in dB: p - PL - N0 B
    # = 23 - 90.5 - (-174 + 10 log10(1e6) = -114) = 46.5 dB.
    assert path_loss_db(100.0) == pytest.approx(90.5)
    assert rate_bps(1e6, 23.0, 100.0) == pytest.approx(1e6 * math.log2(1 + 10**4.65))
    # 3 dB more fading gain doubles the SNR
    assert rate_bps(1e6, 23.0, 100.0, fading=2.0) == pytest.approx(
        1e6 * math.log2(1 + 2 * 10**4.65)
    )


def test_transmission_and_compute_time_by_hand() -> None:
    # 1e6 bytes down at 8 Mbit/s = 1 s; 5e5 bytes up at 4 Mbit/s = 1 s
    assert transmission_s(1e6, 5e5, 8e6, 4e6) == pytest.approx(2.0)
    # 1000 tokens * 4 * 1e6 params / 1 GFLOP/s = 4 s; full fine-tuning 6N
    assert compute_s(1000, 1_000_000, 1e9) == pytest.approx(4.0)
    assert compute_s(1000, 1_000_000, 1e9, full_finetune=True) == pytest.approx(6.0)


# ----------------------------------------------------------------------------- allocation


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


# ----------------------------------------------------------------------------- modules


def test_module_choice_is_an_exact_knapsack() -> None:
    scores = {"a": 6.0, "b": 4.0, "c": 4.0}
    costs = {"a": 3, "b": 2, "c": 2}
    # Budget 4: b + c = 8 beats a = 6 (greedy by score, or by score per cost on ties, takes a).
    assert choose_modules(scores, costs, 4) == ["b", "c"]
    assert choose_modules(scores, costs, 3) == ["a"]
    assert choose_modules(scores, costs, 7) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="planner.budget_fraction"):
        choose_modules(scores, costs, 1)


def test_lora_params_and_top_share_by_hand() -> None:
    assert lora_params({"x": (4, 6), "y": (2, 2)}, ["x", "y"], 2) == 2 * 10 + 2 * 4
    scores = {"m1": 1.0, "m2": 3.0, "m3": 2.0}
    assert top_share(scores, ["m1", "m2", "m3"], 0.5) == ["m2", "m3"]  # ceil(1.5) = 2
    assert top_share(scores, ["m1", "m2", "m3"], 0.1) == ["m2"]
    assert top_share(scores, ["m1", "m2", "m3"], 1.0) == ["m1", "m2", "m3"]


# ----------------------------------------------------------------------------- ranks

M, N = "base.layers.0.q", "base.layers.1.q"


def _key(module: str, part: str) -> str:
    return f"{module}.lora_{part}.weight"


def test_a_fedavg_share_is_a_slice_and_covers_only_the_device_modules() -> None:
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {_key(M, "A"): a, _key(M, "B"): b, _key(N, "A"): a, _key(N, "B"): b}
    share = device_share(state, ["layers.0.q"], 2, exact=False)
    assert set(share) == {_key(M, "A"), _key(M, "B")}
    np.testing.assert_array_equal(share[_key(M, "A")], a[:2])
    np.testing.assert_array_equal(share[_key(M, "B")], b[:, :2])


def test_an_exact_share_is_the_best_rank_r_approximation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(6, 4))
    state = {_key(M, "A"): a.astype(np.float32), _key(M, "B"): b.astype(np.float32)}
    share = device_share(state, ["layers.0.q"], 2, exact=True)
    assert share[_key(M, "A")].shape == (2, 5) and share[_key(M, "B")].shape == (6, 2)
    u, s, vt = np.linalg.svd(b @ a)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(share[_key(M, "B")] @ share[_key(M, "A")], best, atol=1e-4)


def test_partial_average_pads_ranks_and_does_not_dilute_untrained_modules() -> None:
    s1 = {_key(M, "A"): np.array([[1.0, 1.0]]), _key(M, "B"): np.array([[2.0], [2.0]])}
    a2, b2 = np.array([[4.0, 0.0], [0.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    n_a, n_b = np.array([[7.0, 7.0], [7.0, 7.0]]), np.ones((2, 2))
    s2 = {_key(M, "A"): a2, _key(M, "B"): b2, _key(N, "A"): n_a, _key(N, "B"): n_b}
    out = partial_average([s1, s2], [1.0, 3.0], rank=2)
    # M: s1 padded to [[1, 1], [0, 0]] and [[2, 0], [2, 0]], weights 1/4 and 3/4
    np.testing.assert_allclose(out[_key(M, "A")], [[3.25, 0.25], [0.0, 3.0]])
    np.testing.assert_allclose(out[_key(M, "B")], [[1.25, 0.0], [0.5, 0.75]])
    # N: only s2 trained it, so it is s2's, not 3/4 of it
    np.testing.assert_allclose(out[_key(N, "A")], n_a)
    assert pad_rank(s1, 3)[_key(M, "A")].shape == (3, 2)


def test_bf16_only_where_native() -> None:
    from fedpeat.config import DeviceProfile
    from strategies.planning import allowed_bits, compute_bits

    native, emulated = DeviceProfile(bf16=True), DeviceProfile(bf16=False)
    assert allowed_bits([4, 8, 16, 32], native) == [4, 8, 16, 32]
    assert allowed_bits([4, 8, 16, 32], emulated) == [4, 8, 32]
    assert [compute_bits(b, native, 32) for b in (4, 8, 16, 32)] == [16, 16, 16, 32]
    assert [compute_bits(b, emulated, 32) for b in (4, 8, 32)] == [32, 32, 32]
