"""Aggregation maths on adapter states: pure functions on dicts of numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def _checked_weights(states: Sequence[State], weights: Sequence[float]) -> np.ndarray:
    """The weights as float64, after checking there is something to weigh and they make sense."""
    if not states:
        raise ValueError("nothing to aggregate: no states")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero; got {list(w)}")
    return w


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg of adapter states: `sum_i w_i * s_i / sum_i w_i`, key by key, in float64.

    For LoRA this averages A and B separately (FlowerTune's baseline); note that
    mean(B) @ mean(A) is not the mean of the updates B_i @ A_i.

    Raises ValueError on no states, a length mismatch, negative or all-zero weights, or states
    whose keys or shapes differ.
    """
    w = _checked_weights(states, weights)
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


# --------------------------------------------------------------------------- exact LoRA

_A, _B = ".lora_A.", ".lora_B."


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """Module name -> (A key, B key) for every LoRA module in `state`."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if _A in key:
            module = key.split(_A)[0]
            b_key = key.replace(_A, _B)
            if b_key not in state:
                raise ValueError(f"{key} has no matching lora_B tensor")
            pairs[module] = (key, b_key)
    return pairs


def _zero_below(s: np.ndarray, shape: tuple[int, ...]) -> float:
    """Singular values at or below this are numerically zero (numpy's matrix_rank rule)."""
    return float((s[0] if len(s) else 0.0) * max(shape) * np.finfo(np.float64).eps)


def factorise(
    delta: np.ndarray, rank: int, fill: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of `delta` (out x in): B = U S (out x rank), A = V^T (rank x in),
    and the discarded singular values, whose root sum of squares is the Frobenius error of the
    truncation (Eckart-Young).

    The singular values go to B and A keeps orthonormal rows, as a fresh LoRA A is a random
    matrix of unit-order rows and B carries the learned magnitude: the next round's gradients
    (dL/dB ~ A, dL/dA ~ B^T) then have the scales LoRA training expects. Rows of A for
    directions `delta` does not use (zero singular values) are arbitrary; the SVD would fill
    them with an arbitrary completion (for delta = 0, standard basis vectors, so training would
    read only the first `rank` inputs). `fill` (rank x in, e.g. the adapter's random initial A)
    supplies them instead, orthonormalised against the used rows; their B columns are zero, so
    the product is unchanged.
    """
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = min(rank, len(s))
    tol = _zero_below(s, delta.shape)
    used = int(np.sum(s[:k] > tol)) if fill is not None else k
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :used] = u[:, :used] * s[:used]
    a[:used] = vt[:used]
    if fill is not None:
        for j in range(used, rank):
            row = fill[j % fill.shape[0]].astype(np.float64)
            row = row - a[:j].T @ (a[:j] @ row)  # Gram-Schmidt against the rows so far
            norm = np.linalg.norm(row)
            if norm > 1e-12:
                a[j] = row / norm
    return b, a, s[k:]


def _product(state: State, a_key: str, b_key: str) -> np.ndarray:
    return state[b_key].astype(np.float64) @ state[a_key].astype(np.float64)


def exact_aggregate(
    states: Sequence[State],
    weights: Sequence[float],
    rank: int,
    scales: Sequence[float] | None = None,
    fill: State | None = None,
    received: Sequence[State | None] | None = None,
    base: State | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Aggregate LoRA adapters through their products, then re-factorise (FlexLoRA style).

    Per module, over the states that contain it: dW = sum_i w_i s_i B_i A_i / sum_i w_i, with
    `scales` s_i (alpha / r_i when ranks differ; 1 when they are equal). A module a device did not
    train does not dilute the average. The result is the best rank-`rank` factorisation B A of
    dW (so with all ranks equal and rank >= sum of ranks it *is* the weighted mean of the updates).
    Non-LoRA tensors are averaged with the same renormalised weights.

    `received` (per state, the adapter that device started from; None = `base`) and `base` (the
    global adapter of the round) make the average one of *updates*: dW = G + sum_i w_i (P_i - R_i)
    with G = base's product, P_i the returned and R_i the received product. A device that got only
    its rank's truncation of G then does not erase the directions of G it never saw, which the plain
    product average would (it would replace G by the mean of truncations plus updates). When
    every device received G itself the two are the same.

    `fill` (a state with the same A keys, e.g. the initial adapter) gives A its rows where dW has
    no direction (see `factorise`). Returns the aggregated state (float32, A: rank x in,
    B: out x rank) and, per module, the truncation error ||dW - B A||_F.
    """
    w = _checked_weights(states, weights)
    s = np.ones(len(states)) if scales is None else np.asarray(scales, dtype=np.float64)
    if received is not None and (base is None or len(received) != len(states)):
        raise ValueError("`received` needs `base` and one entry per state")
    modules: dict[str, tuple[str, str]] = {}
    for state in states:
        modules.update(lora_pairs(state))
    out: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    for module, (a_key, b_key) in modules.items():
        members = [i for i, st in enumerate(states) if a_key in st]
        total = w[members].sum()
        if total <= 0:
            continue
        delta = sum((w[i] / total) * s[i] * _product(states[i], a_key, b_key) for i in members)
        if received is not None and base is not None and a_key in base:
            start = _product(base, a_key, b_key)
            delta = start + delta
            for i in members:
                got = received[i]
                r_i = _product(got, a_key, b_key) if got is not None and a_key in got else start
                delta = delta - (w[i] / total) * r_i
        init = fill.get(a_key) if fill is not None else None
        b, a, dropped = factorise(np.asarray(delta), rank, init)
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
        errors[module] = float(np.sqrt(np.sum(dropped**2)))
    lora_keys = {k for pair in modules.values() for k in pair}
    others = sorted({k for st in states for k in st} - lora_keys)
    for key in others:
        members = [i for i, st in enumerate(states) if key in st]
        total = w[members].sum()
        out[key] = sum((w[i] / total) * states[i][key].astype(np.float64) for i in members).astype(
            np.float32
        )
    return out, errors


def truncate_state(state: State, rank: int, fill: State | None = None) -> dict[str, np.ndarray]:
    """A device's share of the global adapter: every module cut to its own (smaller) rank;
    `fill` as in `exact_aggregate`."""
    out = dict(state)
    for a_key, b_key in lora_pairs(state).values():
        init = fill.get(a_key) if fill is not None else None
        b, a, _ = factorise(state[b_key] @ state[a_key], rank, init)
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
    return out


def residual_state(state: State, rank: int) -> dict[str, np.ndarray]:
    """What a device's rank-`rank` truncation of `state` leaves out, as frozen LoRA factors.

    Per module, the SVD directions `rank`.. of B A with non-zero singular values: B_res = U S,
    A_res = V^T, so that truncate_state(state, rank) + B_res A_res = B A exactly. A device that
    adds it to its forward pass trains at the global adapter itself rather than at its
    truncation; without it, its update re-learns the directions it cannot see, and the server,
    which keeps them (the update average in `exact_aggregate`), counts them twice. Modules with
    nothing left out are omitted.
    """
    out: dict[str, np.ndarray] = {}
    for a_key, b_key in lora_pairs(state).values():
        delta = state[b_key].astype(np.float64) @ state[a_key].astype(np.float64)
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        tol = _zero_below(s, delta.shape)
        k = int(np.sum(s > tol))
        if k <= rank:
            continue
        out[b_key] = (u[:, rank:k] * s[rank:k]).astype(np.float32)
        out[a_key] = vt[rank:k].astype(np.float32)
    return out


# --------------------------------------------------------------------------- heterogeneous ranks


def _of_module(key: str, modules: Sequence[str]) -> bool:
    return any(f".{m}.lora_" in key for m in modules)


def device_share(
    state: State, modules: Sequence[str], rank: int, exact: bool, fill: State | None = None
) -> dict[str, np.ndarray]:
    """What a device with `rank` that trains `modules` receives of the global adapter.

    `exact`: each module's best rank-`rank` approximation of B A (its own rank's truncation,
    FlexLoRA); otherwise the first `rank` rows of A and columns of B (HetLoRA's slice, what the
    plain A/B average pairs with).
    """
    sub = {k: v for k, v in state.items() if _of_module(k, modules)}
    if exact:
        return truncate_state(sub, rank, fill)
    out = {}
    for key, value in sub.items():
        out[key] = value[:rank] if _A in key else value[:, :rank] if _B in key else value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def device_residual(state: State, modules: Sequence[str], rank: int) -> dict[str, np.ndarray]:
    """`residual_state` of the modules a device trains: what its `device_share` leaves out."""
    return residual_state({k: v for k, v in state.items() if _of_module(k, modules)}, rank)


def _rank_axis(key: str) -> int | None:
    """The axis of a LoRA tensor that indexes the rank (A: rows, B: columns), None otherwise."""
    return 0 if _A in key else 1 if _B in key else None


def partial_average(
    states: Sequence[State], weights: Sequence[float], rank: int, base: State | None = None
) -> dict[str, np.ndarray]:
    """FedAvg over states of different ranks and module sets, without zero dilution: each rank
    component (a row of A, a column of B) is the weighted mean over the states that hold it
    (weights renormalised per component); a component no state holds keeps `base`'s (the global
    adapter the devices' slices came from; zeros without it). Modules no state trained are left
    out. A round in which every device returns the slice it received leaves `base` unchanged."""
    w = _checked_weights(states, weights)
    out: dict[str, np.ndarray] = {}
    for key in sorted({k for st in states for k in st}):
        members = [i for i, st in enumerate(states) if key in st]
        if w[members].sum() <= 0:
            continue
        axis = _rank_axis(key)
        if axis is None:
            total = w[members].sum()
            acc = sum((w[i] / total) * states[i][key].astype(np.float64) for i in members)
            out[key] = np.asarray(acc).astype(np.float32)
            continue
        shape = list(states[members[0]][key].shape)
        shape[axis] = rank
        acc = np.zeros(shape, np.float64)
        held = np.zeros(rank, np.float64)  # summed weight of the states holding component j
        for i in members:
            value = np.moveaxis(states[i][key].astype(np.float64), axis, 0)[:rank]
            np.moveaxis(acc, axis, 0)[: len(value)] += w[i] * value
            held[: len(value)] += w[i]
        prior = np.zeros(shape) if base is None or key not in base else base[key]
        view, prior_view = np.moveaxis(acc, axis, 0), np.moveaxis(prior, axis, 0)
        for j in range(rank):
            view[j] = view[j] / held[j] if held[j] > 0 else prior_view[j]
        out[key] = acc.astype(np.float32)
    return out


# --------------------------------------------------------------------------- stacking (FLoRA)


def stack_used(state: State) -> int:
    """Rank components of the global adapter the stack has filled: one past the last non-zero
    column of any B (a fresh LoRA's B is zero, so an unfilled component's is)."""
    used = 0
    for key, value in state.items():
        if _B in key and (nz := np.flatnonzero(np.any(value != 0, axis=0))).size:
            used = max(used, int(nz[-1]) + 1)
    return used


def stack_share(
    state: State, modules: Sequence[str], rank: int, offset: int, used: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What a device gets under stacking, for its `modules`: the global adapter's components
    [offset, offset + rank) to train (a fresh LoRA where the stack is still empty: the initial
    random A, zero B), and the other filled components [0, used) as frozen terms, so it trains
    on top of everything stacked so far (FLoRA merges the stack into the model it sends).
    With offset 0 and the filled count, the two together are the whole global adapter."""
    share: dict[str, np.ndarray] = {}
    residual: dict[str, np.ndarray] = {}
    rest = [j for j in range(used) if not offset <= j < offset + rank]
    sub = {k: v for k, v in state.items() if _of_module(k, modules)}
    for a_key, b_key in lora_pairs(sub).values():
        share[a_key] = np.ascontiguousarray(state[a_key][offset : offset + rank])
        share[b_key] = np.ascontiguousarray(state[b_key][:, offset : offset + rank])
        if rest:
            residual[a_key] = np.ascontiguousarray(state[a_key][rest])
            residual[b_key] = np.ascontiguousarray(state[b_key][:, rest])
    return share, residual


def stack_aggregate(
    base: State, states: Sequence[State], weights: Sequence[float], offsets: Sequence[int]
) -> dict[str, np.ndarray]:
    """FLoRA's stacking: device i's adapter, trained from a fresh block, is written into the
    global adapter at [offset_i, offset_i + r_i): A_i as it is and B_i times p_i, its weight
    over those of the devices that trained the module. The global product gains exactly
    sum_i p_i B_i A_i: no average of factors, no truncation. Everything outside the blocks keeps
    `base`'s; tensors that are not LoRA factors take the weighted mean."""
    w = _checked_weights(states, weights)
    out = {k: np.array(v, dtype=np.float32) for k, v in base.items()}
    for key in sorted({k for st in states for k in st}):
        members = [i for i, st in enumerate(states) if key in st]
        total = w[members].sum()
        if total <= 0:
            continue
        axis = _rank_axis(key)
        if axis is None:
            acc = sum((w[i] / total) * states[i][key].astype(np.float64) for i in members)
            out[key] = np.asarray(acc, dtype=np.float32)
            continue
        for i in members:
            value = states[i][key].astype(np.float64) * (w[i] / total if axis == 1 else 1.0)
            block = slice(offsets[i], offsets[i] + value.shape[axis])
            np.moveaxis(out[key], axis, 0)[block] = np.moveaxis(value, axis, 0)
    return out


def stack_room(
    state: State, need: int, rank: int, fill: State | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Make room for `need` more components in a stack of capacity `rank`: where it would
    overflow, every module's product is re-factorised into the first rank - need components
    (the rest get `fill`'s A and zero B: free again). Returns the state and the largest
    truncation error ||dW - B A||_F over modules (0 when nothing had to move)."""
    keep = rank - need
    if keep < 0:
        raise ValueError(f"a round's stacked ranks ({need}) exceed the global rank {rank}")
    if stack_used(state) <= keep:
        return dict(state), 0.0
    out, error = dict(state), 0.0
    for a_key, b_key in lora_pairs(state).values():
        init = fill.get(a_key) if fill is not None else None
        b, a, dropped = factorise(_product(state, a_key, b_key), keep, init)
        full_a = np.array(init if init is not None else state[a_key], dtype=np.float64)
        full_a[:keep] = a
        full_b = np.zeros(state[b_key].shape)
        full_b[:, :keep] = b
        out[a_key], out[b_key] = full_a.astype(np.float32), full_b.astype(np.float32)
        error = max(error, float(np.sqrt(np.sum(dropped**2))))
    return out, error


# --------------------------------------------------------------------------- outlier updates


def update_norm(state: State, start: State) -> float:
    """L2 norm of `state - start` over every tensor together (float64)."""
    return float(
        np.sqrt(
            sum(
                np.sum((state[k].astype(np.float64) - start[k].astype(np.float64)) ** 2)
                for k in state
            )
        )
    )


def norm_outliers(
    norms: Mapping[int, float], bound: float, trusted: Sequence[float] = ()
) -> dict[int, str]:
    """Updates whose norm exceeds `bound` x the round's reference: id -> reason.

    The reference is the lower median of the devices' norms and the `trusted` ones (the server's
    own update): with two devices it is the smaller, so one scaled-up update cannot drag the
    reference up to itself; with a majority of honest updates it is an honest one. A reference
    of zero (no one moved) gives no scale to compare with, so nothing is rejected. `bound` <= 0
    turns the check off.
    """
    values = sorted([*norms.values(), *trusted])
    if bound <= 0 or not values:
        return {}
    reference = values[(len(values) - 1) // 2]
    if reference <= 0:
        return {}
    return {
        key: (
            f"update norm {norm:.4g} is {norm / reference:.3g}x the round's median "
            f"{reference:.4g} (strategy.norm_bound={bound:g})"
        )
        for key, norm in norms.items()
        if norm > bound * reference
    }


def merge_updates(
    rule: str,
    states: Sequence[State],
    weights: Sequence[float],
    rank: int,
    planned: bool = False,
    fill: State | None = None,
    received: Sequence[State | None] | None = None,
    base: State | None = None,
    offsets: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray], float | None]:
    """The new global adapter by `strategy.aggregation` (`rule`), and for `exact` the largest
    truncation error ||dW - B A||_F over modules (None otherwise).

    `exact`: `exact_aggregate` (unused directions keep `fill`'s random A, never axis-aligned
    rows; averaging the updates from what each device `received`, not the products, keeps what
    truncated devices never saw). `fedavg`: the plain weighted average, or with `planned`
    devices (ranks and module sets differ) `partial_average` at the global `rank` (rank
    components no device holds keep `base`'s). `stack`: `stack_aggregate` of each device's block
    at its `offsets` entry into `base`.
    """
    if rule == "stack":
        if base is None or offsets is None or len(offsets) != len(states):
            raise ValueError("stacking needs `base` and one offset per state")
        return stack_aggregate(base, states, weights, offsets), None
    if rule == "exact":
        merged, errors = exact_aggregate(
            states, weights, rank=rank, fill=fill, received=received, base=base
        )
        return merged, max(errors.values(), default=0.0)
    if planned:
        return partial_average(states, weights, rank, base), None
    return weighted_average(states, weights), None
