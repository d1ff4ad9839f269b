"""Aggregation maths against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import weighted_average, weighted_mean


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
