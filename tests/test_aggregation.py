"""Aggregation maths against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import (
    device_share,
    partial_average,
    weighted_average,
    weighted_mean,
)


def test_weighted_average_by_hand() -> None:
    # Two devices with 1 and 3 examples: weights 1/4 and 3/4.
    a = {
        "lora_A": np.array([[1.0, 2.0]], dtype=np.float32),
        "lora_B": np.array([[4.0], [0.0]], dtype=np.float32),
    }
    b = {
        "lora_A": np.array([[5.0, -2.0]], dtype=np.float32),
        "lora_B": np.array([[0.0], [8.0]], dtype=np.float32),
    }
    out = weighted_average([a, b], [1, 3])
    # lora_A: 0.25*[1,2] + 0.75*[5,-2] = [4, -1]; lora_B: 0.25*[4,0] + 0.75*[0,8] = [1, 6]
    np.testing.assert_allclose(out["lora_A"], [[4.0, -1.0]])
    np.testing.assert_allclose(out["lora_B"], [[1.0], [6.0]])
    assert out["lora_A"].dtype == np.float32


def test_fedavg_of_lora_factors_is_not_the_mean_update() -> None:
    # Why `exact` aggregation exists: mean(B) @ mean(A) != mean(B @ A).
    a1, b1 = np.array([[1.0, 0.0]]), np.array([[1.0], [0.0]])
    a2, b2 = np.array([[0.0, 1.0]]), np.array([[0.0], [1.0]])
    avg = weighted_average([{"A": a1, "B": b1}, {"A": a2, "B": b2}], [1, 1])
    product_of_means = avg["B"] @ avg["A"]  # [[.25,.25],[.25,.25]]
    mean_of_products = 0.5 * (b1 @ a1 + b2 @ a2)  # [[.5,0],[0,.5]]
    np.testing.assert_allclose(product_of_means, [[0.25, 0.25], [0.25, 0.25]])
    np.testing.assert_allclose(mean_of_products, [[0.5, 0.0], [0.0, 0.5]])


def test_single_state_is_returned_unchanged() -> None:
    s = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(weighted_average([s], [7])["x"], s["x"])


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([], [], "no states"),
        ([{"x": np.zeros(2)}], [1, 2], "1 states but 2 weights"),
        ([{"x": np.zeros(2)}, {"x": np.zeros(2)}], [0, 0], "not all zero"),
        ([{"x": np.zeros(2)}, {"x": np.zeros(2)}], [1, -1], "non-negative"),
        ([{"x": np.zeros(2)}, {"y": np.zeros(2)}], [1, 1], "different keys"),
        ([{"x": np.zeros(2)}, {"x": np.zeros(3)}], [1, 1], "shape"),
    ],
)
def test_weighted_average_rejects_bad_input(states, weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_average(states, weights)


def test_weighted_mean_by_hand() -> None:
    # (2*1 + 4*3) / 4 = 3.5
    assert weighted_mean([2.0, 4.0], [1, 3]) == pytest.approx(3.5)
    with pytest.raises(ValueError):
        weighted_mean([1.0], [0])


# ------------------------------------------------------------------ exact LoRA aggregation

from strategies.aggregation import exact_aggregate, factorise, truncate_state  # noqa: E402


def _lora(b: np.ndarray, a: np.ndarray, name: str = "m") -> dict[str, np.ndarray]:
    return {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}


def test_exact_aggregation_is_the_weighted_mean_of_the_updates_when_rank_allows() -> None:
    # Two rank-1 devices with weights 1 and 3; the server rank 2 holds both directions.
    b1, a1 = np.array([[1.0], [0.0]]), np.array([[2.0, 0.0, 0.0]])
    b2, a2 = np.array([[0.0], [1.0]]), np.array([[0.0, 0.0, 4.0]])
    state, errors = exact_aggregate([_lora(b1, a1), _lora(b2, a2)], [1, 3], rank=2)
    merged = state["m.lora_B.weight"] @ state["m.lora_A.weight"]
    # 1/4 * [[2,0,0],[0,0,0]] + 3/4 * [[0,0,0],[0,0,4]] = [[0.5,0,0],[0,0,3]]
    np.testing.assert_allclose(merged, [[0.5, 0, 0], [0, 0, 3.0]], atol=1e-6)
    assert errors["m"] == pytest.approx(0.0, abs=1e-9)
    assert state["m.lora_A.weight"].shape == (2, 3) and state["m.lora_B.weight"].shape == (2, 2)


def test_truncation_error_is_the_discarded_singular_values() -> None:
    # dW = diag(3, 2, 1) has singular values 3, 2, 1: rank 1 drops 2 and 1.
    delta = np.diag([3.0, 2.0, 1.0])
    b, a, dropped = factorise(delta, 1)
    np.testing.assert_allclose(dropped, [2.0, 1.0])
    assert np.linalg.norm(delta - b @ a) == pytest.approx(np.sqrt(2.0**2 + 1.0**2))
    # Through exact_aggregate: one device whose update is that matrix (B = I, A = dW).
    _, errors = exact_aggregate([_lora(np.eye(3), delta)], [1], rank=1)
    assert errors["m"] == pytest.approx(np.sqrt(5.0))


def test_modules_a_device_did_not_train_are_not_diluted() -> None:
    one = {
        **_lora(np.array([[1.0]]), np.array([[2.0]]), "q"),
        **_lora(np.array([[1.0]]), np.array([[6.0]]), "v"),
    }
    two = _lora(np.array([[1.0]]), np.array([[4.0]]), "q")  # trained q only
    state, _ = exact_aggregate([one, two], [1, 1], rank=1)
    # q: mean of 2 and 4 = 3; v: only device one trained it, so 6 (not 3)
    assert (state["q.lora_B.weight"] @ state["q.lora_A.weight"]).item() == pytest.approx(3.0)
    assert (state["v.lora_B.weight"] @ state["v.lora_A.weight"]).item() == pytest.approx(6.0)


def test_scales_weight_heterogeneous_ranks() -> None:
    # alpha/r differs by device: the update is scale * B A.
    state, _ = exact_aggregate(
        [_lora(np.array([[1.0]]), np.array([[1.0]])), _lora(np.array([[1.0]]), np.array([[1.0]]))],
        [1, 1],
        rank=1,
        scales=[2.0, 4.0],
    )
    assert (state["m.lora_B.weight"] @ state["m.lora_A.weight"]).item() == pytest.approx(3.0)


def test_each_device_gets_its_own_rank_truncation() -> None:
    rng = np.random.default_rng(0)
    b, a = rng.normal(size=(5, 4)), rng.normal(size=(4, 6))
    small = truncate_state(_lora(b, a), 2)
    assert small["m.lora_B.weight"].shape == (5, 2) and small["m.lora_A.weight"].shape == (2, 6)
    s = np.linalg.svd(b @ a, compute_uv=False)
    err = np.linalg.norm(b @ a - small["m.lora_B.weight"] @ small["m.lora_A.weight"])
    assert err == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-4)


def test_fedavg_differs_from_exact_on_the_same_updates() -> None:
    b1, a1 = np.array([[1.0], [0.0]]), np.array([[1.0, 0.0]])
    b2, a2 = np.array([[0.0], [1.0]]), np.array([[0.0, 1.0]])
    states = [_lora(b1, a1), _lora(b2, a2)]
    avg = weighted_average(states, [1, 1])
    exact, _ = exact_aggregate(states, [1, 1], rank=2)
    np.testing.assert_allclose(
        avg["m.lora_B.weight"] @ avg["m.lora_A.weight"], [[0.25, 0.25], [0.25, 0.25]]
    )
    np.testing.assert_allclose(
        exact["m.lora_B.weight"] @ exact["m.lora_A.weight"], [[0.5, 0], [0, 0.5]], atol=1e-9
    )


def test_factors_keep_a_orthonormal_and_the_magnitude_in_b() -> None:
    # delta = diag(3, 2, 0): rank 3 keeps every direction; the zero one still has a unit row in
    # A, so its (zero) column of B can learn next round.
    delta = np.diag([3.0, 2.0, 0.0])
    b, a, dropped = factorise(delta, 3)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(b @ a, delta, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), [3.0, 2.0, 0.0], atol=1e-12)
    assert dropped.size == 0


def test_unused_directions_take_the_fill_rows_not_the_svd_completion() -> None:
    # delta = 0 (no update yet): B must be zero and A the fill, orthonormalised; without a fill
    # the SVD completes with standard basis vectors.
    fill = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    b, a, _ = factorise(np.zeros((2, 3)), 2, fill)
    np.testing.assert_array_equal(b, 0.0)
    np.testing.assert_allclose(a[0], [2**-0.5, 2**-0.5, 0.0])
    # the second row: fill[1] minus its projection on a[0], normalised
    second = np.array([-0.5, 0.5, 1.0])
    np.testing.assert_allclose(a[1], second / np.linalg.norm(second))
    # delta of rank 1: the used row is V^T's, the other comes from the fill, product unchanged
    delta = np.outer([1.0, 2.0], [0.0, 0.0, 3.0])
    b, a, _ = factorise(delta, 2, fill)
    np.testing.assert_allclose(b @ a, delta, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(abs(a[0]), [0.0, 0.0, 1.0], atol=1e-12)


def test_update_average_keeps_the_directions_a_truncated_device_never_saw() -> None:
    # Global G = [[3,0,0],[0,1,0]] (rank 2). Device 1 (weight 1, rank 1) received T1(G) =
    # [[3,0,0],[0,0,0]] and grew it to [[3.5,0,0],[0,0,0]]; device 2 (weight 3) received G and
    # returned [[3,0,0],[0,1,2]]. Updates: [[.5,0,0],[0,0,0]] and [[0,0,0],[0,0,2]], so
    # G + (1/4, 3/4)-mean = [[3.125,0,0],[0,1,1.5]]. The plain product mean would shrink G's
    # second direction to 0.75 (device 1 never saw it).
    base = _lora(np.array([[3.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    got1 = _lora(np.array([[3.0], [0.0]]), np.array([[1.0, 0.0, 0.0]]))
    dev1 = _lora(np.array([[3.5], [0.0]]), np.array([[1.0, 0.0, 0.0]]))
    dev2 = _lora(np.array([[3.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]]))
    state, errors = exact_aggregate([dev1, dev2], [1, 3], rank=2, received=[got1, None], base=base)
    product = state["m.lora_B.weight"] @ state["m.lora_A.weight"]
    np.testing.assert_allclose(product, [[3.125, 0, 0], [0, 1, 1.5]], atol=1e-6)
    assert errors["m"] == pytest.approx(0.0, abs=1e-6)
    plain, _ = exact_aggregate([dev1, dev2], [1, 3], rank=2)
    plain_product = plain["m.lora_B.weight"] @ plain["m.lora_A.weight"]
    np.testing.assert_allclose(plain_product, [[3.125, 0, 0], [0, 0.75, 1.5]], atol=1e-6)
    # Every device received G itself: the update average is the product average.
    same, _ = exact_aggregate([dev1, dev2], [1, 3], rank=2, received=[None, None], base=base)
    np.testing.assert_allclose(
        same["m.lora_B.weight"] @ same["m.lora_A.weight"], plain_product, atol=1e-6
    )


def test_residual_is_what_the_truncation_leaves_out() -> None:
    from strategies.aggregation import residual_state

    # G = diag(3, 2, 1) as B = I, A = G: rank 1 keeps 3; the residual holds 2 and 1.
    g = np.diag([3.0, 2.0, 1.0])
    state = _lora(np.eye(3), g)
    rest = residual_state(state, 1)
    np.testing.assert_allclose(
        rest["m.lora_B.weight"] @ rest["m.lora_A.weight"], np.diag([0.0, 2.0, 1.0]), atol=1e-12
    )
    assert rest["m.lora_A.weight"].shape == (2, 3)
    kept = truncate_state(state, 1)
    np.testing.assert_allclose(
        kept["m.lora_B.weight"] @ kept["m.lora_A.weight"]
        + rest["m.lora_B.weight"] @ rest["m.lora_A.weight"],
        g,
        atol=1e-12,
    )
    # a rank that holds every non-zero direction leaves nothing: the module is omitted
    assert residual_state(_lora(np.eye(3), np.diag([3.0, 2.0, 0.0])), 2) == {}
    # random factors: truncation + residual is the product, whatever the rank
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(6, 5)), rng.normal(size=(5, 7))
    for rank in (1, 2, 4):
        kept, rest = truncate_state(_lora(b, a), rank), residual_state(_lora(b, a), rank)
        total = kept["m.lora_B.weight"] @ kept["m.lora_A.weight"]
        total = total + rest["m.lora_B.weight"] @ rest["m.lora_A.weight"]
        np.testing.assert_allclose(total, b @ a, atol=1e-5)


def test_update_norm_and_outliers_by_hand() -> None:
    from strategies.aggregation import norm_outliers, update_norm

    start = {"a": np.zeros(2), "b": np.ones((1, 1))}
    # (3, 4) and 1 -> 1: sqrt(9 + 16 + 0) = 5
    assert update_norm({"a": np.array([3.0, 4.0]), "b": np.ones((1, 1))}, start) == 5.0
    # norms 1, 2, 3 and a scaled one 3e4; trusted server 2: sorted 1,2,2,3,3e4 -> median 2
    got = norm_outliers({1: 1.0, 2: 2.0, 3: 3.0, 4: 3e4}, 10.0, trusted=[2.0])
    assert list(got) == [4] and "1.5e+04x the round's median 2" in got[4]
    # two devices, one scaled x1e4: the lower median is the honest one
    assert list(norm_outliers({1: 1.0, 2: 1e4}, 10.0)) == [2]
    # exactly at the bound is kept; the check off, or nobody moved: nothing rejected
    assert norm_outliers({1: 1.0, 2: 10.0}, 10.0) == {}
    assert norm_outliers({1: 1.0, 2: 1e9}, 0.0) == {}
    assert norm_outliers({1: 0.0, 2: 0.0, 3: 5.0}, 10.0) == {}


# ------------------------------------------------------------------ heterogeneous ranks

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


def test_partial_average_averages_each_rank_component_over_its_holders() -> None:
    s1 = {_key(M, "A"): np.array([[1.0, 1.0]]), _key(M, "B"): np.array([[2.0], [2.0]])}
    a2, b2 = np.array([[4.0, 0.0], [0.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    n_a, n_b = np.array([[7.0, 7.0], [7.0, 7.0]]), np.ones((2, 2))
    s2 = {_key(M, "A"): a2, _key(M, "B"): b2, _key(N, "A"): n_a, _key(N, "B"): n_b}
    out = partial_average([s1, s2], [1.0, 3.0], rank=2)
    # M, component 0 (both hold it, weights 1/4 and 3/4): A (1*[1, 1] + 3*[4, 0]) / 4, B
    # (1*[2, 2] + 3*[1, 0]) / 4; component 1 only s2 holds: s2's own, not 3/4 of it.
    np.testing.assert_allclose(out[_key(M, "A")], [[3.25, 0.25], [0.0, 4.0]])
    np.testing.assert_allclose(out[_key(M, "B")], [[1.25, 0.0], [0.5, 1.0]])
    # N: only s2 trained it, so it is s2's
    np.testing.assert_allclose(out[_key(N, "A")], n_a)


def test_partial_average_returning_the_received_slices_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    base = {_key(M, "A"): rng.normal(size=(4, 3)), _key(M, "B"): rng.normal(size=(5, 4))}
    # Ranks 1 and 2 of a rank-4 global: each returns exactly its slice (first r rows of A,
    # first r columns of B); components 2 and 3 nobody holds keep the global's. Zero padding
    # would have diluted component 1 to a third (only the weight-1 device holds it) and zeroed
    # components 2 and 3.
    slices = [
        {_key(M, "A"): base[_key(M, "A")][:r], _key(M, "B"): base[_key(M, "B")][:, :r]}
        for r in (1, 2)
    ]
    out = partial_average(slices, [2.0, 1.0], rank=4, base=base)
    for key, value in base.items():
        np.testing.assert_allclose(out[key], value, rtol=1e-6)


# --------------------------------------------------------------------------- stacking (FLoRA)

from strategies.aggregation import (  # noqa: E402
    merge_updates,
    stack_aggregate,
    stack_room,
    stack_share,
    stack_used,
)

_QA, _QB = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


def _global(rank: int = 4, used: int = 0) -> dict[str, np.ndarray]:
    """A global adapter of `rank` components on a 3-in, 2-out module: A rows 1..rank (row j is
    j+1 in every entry), B columns j < `used` filled with j+1, the rest zero."""
    a = np.repeat(np.arange(1.0, rank + 1)[:, None], 3, axis=1).astype(np.float32)
    b = np.zeros((2, rank), np.float32)
    b[:, :used] = np.arange(1.0, used + 1)
    return {_QA: a, _QB: b}


def test_stack_used_counts_the_filled_components() -> None:
    assert stack_used(_global(4, 0)) == 0
    assert stack_used(_global(4, 2)) == 2
    g = _global(4, 0)
    g[_QB][1, 2] = 0.5  # one entry of component 2 filled: components 0..2 count as used
    assert stack_used(g) == 3


def test_stacking_places_each_block_and_keeps_the_sum_of_products() -> None:
    base = _global(4, 0)
    # Device 1 (weight 1) trained components [0, 1), device 2 (weight 3) components [1, 3).
    s1 = {_QA: np.full((1, 3), 2.0, np.float32), _QB: np.array([[1.0], [2.0]], np.float32)}
    s2 = {
        _QA: np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32),
        _QB: np.array([[4.0, 0.0], [0.0, 4.0]], np.float32),
    }
    out = stack_aggregate(base, [s1, s2], [1.0, 3.0], [0, 1])
    # A blocks as returned; B blocks times 1/4 and 3/4; component 3 keeps base's A and zero B.
    assert out[_QA][0].tolist() == [2.0, 2.0, 2.0]
    assert out[_QA][1:3].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert out[_QA][3].tolist() == [4.0, 4.0, 4.0]
    assert out[_QB].tolist() == [[0.25, 3.0, 0.0, 0.0], [0.5, 0.0, 3.0, 0.0]]
    # The global product is exactly 1/4 B1 A1 + 3/4 B2 A2.
    want = 0.25 * s1[_QB] @ s1[_QA] + 0.75 * s2[_QB] @ s2[_QA]
    assert np.allclose(out[_QB] @ out[_QA], want)
    same, error = merge_updates("stack", [s1, s2], [1.0, 3.0], 4, True, base=base, offsets=[0, 1])
    assert error is None and all(np.array_equal(same[k], out[k]) for k in out)
    with pytest.raises(ValueError, match="one offset per state"):
        merge_updates("stack", [s1, s2], [1.0, 3.0], 4, True, base=base, offsets=[0])


def test_a_stack_share_is_a_fresh_block_and_the_rest_is_frozen() -> None:
    g = _global(4, 2)
    share, rest = stack_share(g, ["q_proj"], 1, offset=2, used=2)
    # To train: component 2 (A row 3, B zero); frozen: components 0 and 1.
    assert share[_QA].tolist() == [[3.0, 3.0, 3.0]] and not share[_QB].any()
    assert rest[_QA].tolist() == [[1.0] * 3, [2.0] * 3] and rest[_QB].tolist() == [[1, 2]] * 2
    # Evaluating (offset 0, rank 1): component 0 as the share, component 1 frozen: together the
    # whole global product.
    share, rest = stack_share(g, ["q_proj"], 1, offset=0, used=2)
    whole = share[_QB] @ share[_QA] + rest[_QB] @ rest[_QA]
    assert np.allclose(whole, g[_QB] @ g[_QA])
    assert stack_share(g, ["k_proj"], 1, 0, 2) == ({}, {})  # a module it does not train


def test_a_full_stack_is_refactorised_to_make_room() -> None:
    g = _global(4, 3)  # B columns 1, 2, 3 on A rows 1, 2, 3 (each entry j+1): product rank 1
    kept, error = stack_room(g, need=1, rank=4)  # 3 used + 1 fits: nothing moves
    assert error == 0.0 and np.array_equal(kept[_QB], g[_QB])
    fill = {_QA: np.eye(4, 3, dtype=np.float32)}
    roomy, error = stack_room(g, need=3, rank=4, fill=fill)  # room for 3: keep 1 component
    # The product (columns (1 + 4 + 9) = 14 times ones) has rank 1: nothing lost, one used.
    assert error == pytest.approx(0.0, abs=1e-4) and stack_used(roomy) == 1
    assert np.allclose(roomy[_QB] @ roomy[_QA], g[_QB] @ g[_QA], atol=1e-4)
    assert roomy[_QA][1:].tolist() == fill[_QA][1:].tolist()  # free again: fresh rows
    with pytest.raises(ValueError, match="exceed the global rank"):
        stack_room(g, need=5, rank=4)
