"""The strategy's validation and aggregation of hand-built replies."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.fedpeat_strategy import FedPEAT
from strategies.round_stats import from_record
from tests.helpers import device_reply, error_reply


def _state(value: float, shapes) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in shapes.items()}


def _strategy(cfg, shapes) -> FedPEAT:
    """A strategy over hand-made adapter shapes; the server's own training is off."""
    from dataclasses import replace
    from types import SimpleNamespace

    cfg = replace(cfg, strategy=replace(cfg.strategy, server_train=False))
    server = SimpleNamespace(
        initial_state=_state(0.0, shapes),
        adapter_layers=None,
        partial_adapters=False,
        adapter_cfg=cfg.adapter,
        full_shape=SimpleNamespace(params=1_000_000),
    )
    return FedPEAT(cfg, server)  # type: ignore[arg-type]


def test_strategy_rejects_bad_replies_and_averages_the_rest(tiny_cfg) -> None:
    shapes = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
    strategy = _strategy(tiny_cfg, shapes)
    good1 = device_reply(
        1, _state(1.0, shapes), {"num-examples": 1, "train_loss": 2.0, "train_s": 1.0}
    )
    good2 = device_reply(
        2, _state(5.0, shapes), {"num-examples": 3, "train_loss": 4.0, "train_s": 3.0}
    )
    nan_state = _state(1.0, shapes)
    nan_state["a.lora_A.weight"][0, 0] = np.nan
    replies = [
        good1,
        good2,
        error_reply(3, "out of memory"),
        device_reply(4, nan_state, {"num-examples": 1, "train_loss": 1.0}),
        device_reply(
            5,
            {
                "a.lora_A.weight": np.zeros((3, 3), np.float32),
                "a.lora_B.weight": np.zeros((3, 2), np.float32),
            },
            {"num-examples": 1, "train_loss": 1.0},
        ),
        device_reply(6, None, {"num-examples": 1, "train_loss": 1.0}),
        device_reply(7, _state(1.0, shapes), {"num-examples": 0, "train_loss": 1.0}),
        device_reply(8, _state(1.0, shapes), {"num-examples": 2, "train_loss": float("inf")}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    merged = from_record(arrays)
    # (1*1 + 3*5) / 4 = 4
    for v in merged.values():
        np.testing.assert_allclose(v, 4.0)
    assert metrics["train_loss"] == pytest.approx((1 * 2.0 + 3 * 4.0) / 4)
    stats = strategy.stats[1]
    assert stats.num_clients == 2
    reasons = {r["node"]: r["reason"] for r in stats.rejected}
    assert set(reasons) == {3, 4, 5, 6, 7, 8}
    assert "out of memory" in reasons[3]
    assert "non-finite" in reasons[4]
    assert "shape (3, 3)" in reasons[5]
    assert "lacks 'adapter'" in reasons[6]
    assert "num-examples" in reasons[7]
    assert "train_loss" in reasons[8]
    assert stats.bytes_up > 0


def test_strategy_keeps_the_adapter_when_nothing_is_valid(tiny_cfg) -> None:
    strategy = _strategy(tiny_cfg, {"x": (1,)})
    assert strategy.aggregate_train(2, [error_reply(1, "boom")]) == (None, None)
    assert strategy.stats[2].num_clients == 0


def test_server_seconds_by_hand() -> None:
    from fedpeat.config import compose
    from fedpeat.cost import server_seconds

    cfg = compose("")
    # training 4 steps x 4 x 64 = 1,024 tokens at 4N; validation 48 x 64 tokens, twice (plug-in
    # and emulator gap), at 2N: (4 * 1024 + 2 * 6144) * 1e6 / 200e9 = 0.08192 s
    assert server_seconds(cfg, 1_000_000) == pytest.approx(0.08192)
    off = compose("strategy.server_train=false emulator=none controller=none")
    assert server_seconds(off, 1_000_000) == pytest.approx(2 * 3072 * 1e6 / 200e9)


def test_a_consumed_state_becomes_the_same_record() -> None:
    import numpy as np

    from strategies.round_stats import from_record, to_record

    state = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.ones(4, np.float32)}
    want = {k: v.copy() for k, v in state.items()}
    record = to_record(state, consume=True)
    assert state == {}  # each tensor left the dict as it went into the record
    got = from_record(record)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
