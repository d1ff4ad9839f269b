"""Aggregation maths on adapter states: pure functions on dicts of numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg of adapter states: `sum_i w_i * s_i / sum_i w_i`, key by key, in float64.

    For LoRA this averages A and B separately (FlowerTune's baseline); note that
    mean(B) @ mean(A) is not the mean of the updates B_i @ A_i.

    Raises ValueError on no states, a length mismatch, negative or all-zero weights, or states
    whose keys or shapes differ.
    """
    if not states:
        raise ValueError("nothing to aggregate: no states")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero; got {list(w)}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != keys:
            raise ValueError(f"state {i} has different keys from state 0")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        shape = states[0][key].shape
        acc = np.zeros(shape, dtype=np.float64)
        for i, (s, wi) in enumerate(zip(states, w, strict=True)):
            if s[key].shape != shape:
                raise ValueError(f"{key}: state {i} has shape {s[key].shape}, state 0 {shape}")
            acc += wi * s[key].astype(np.float64)
        out[key] = acc.astype(states[0][key].dtype)
    return out


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of scalars (train loss by examples, eval loss by tokens)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(values) != len(w) or w.sum() <= 0:
        raise ValueError("weighted_mean needs equal-length inputs and a positive total weight")
    return float(np.dot(np.asarray(values, dtype=np.float64), w) / w.sum())
