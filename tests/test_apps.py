"""The ClientApp called with hand-built messages, and the strategy's validation and aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType

from client_app.app import app as client_app
from fedpeat.lora import state_shapes
from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY
from fedpeat.task import EmulatorRef, Plan, ServerModel
from strategies.fedpeat_strategy import FedPEAT, from_record
from tests.helpers import context, device_reply, error_reply, server_message


@pytest.fixture(scope="module")
def server(tiny_cfg):
    return ServerModel(tiny_cfg)


def _plan(cfg, server, level: float | None = None) -> tuple[Plan, dict | None]:
    """The plan the strategy would send, and the emulator tensors if it sends one."""
    ref, tensors = EmulatorRef(), None
    if level is not None:
        pkg = server.package(level)
        ref, tensors = EmulatorRef.of(pkg), pkg.state
    plan = Plan.from_config(cfg, 1, ref)
    plan.adapter_layers = server.adapter_layers
    return plan, tensors


@pytest.mark.parametrize("level", [None, 0.5])
def test_client_train_replies_with_a_trained_adapter(
    tiny_cfg, server, level, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))
    state = server.initial_state
    plan, emulator = _plan(tiny_cfg, server, level)
    msg = server_message(MessageType.TRAIN, state, plan.to_json(), emulator=emulator)
    reply = client_app(msg, context(partition_id=1, num_partitions=3))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    new_state = from_record(reply.content.array_records[ADAPTER_KEY])
    # Keys come back in full-model layer indices, whatever the emulator.
    assert state_shapes(new_state) == state_shapes(state)
    assert any(not np.allclose(new_state[k], state[k]) for k in state)  # it trained
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train_loss"])
    assert metrics["train_s"] > 0 and metrics["peak_mem_mb"] > 0
    if level is not None:
        # The device cached the emulator under its digest, and reports it in its profile.
        assert (tmp_path / "device-1" / f"{plan.emulator.digest}.safetensors").is_file()
        query = server_message(MessageType.QUERY, {}, plan.to_json())
        profile = client_app(query, context(partition_id=1, num_partitions=3))
        prof = profile.content.config_records["profile"]
        assert prof["holds"] == plan.emulator.digest
        # It counts its training examples under the server's data config: what it trains on.
        assert prof["data-size"] == metrics["num-examples"]
        assert prof["detected-memory-mb"] > 0 and "memory-mb" not in prof


def test_client_without_the_emulator_reports_a_cache_miss(
    tiny_cfg, server, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))
    plan, _ = _plan(tiny_cfg, server, 0.75)
    msg = server_message(MessageType.TRAIN, server.initial_state, plan.to_json())
    with pytest.raises(Exception, match="not in the device cache"):
        client_app(msg, context(partition_id=0, num_partitions=3))


def test_client_evaluate_reports_perplexity(tiny_cfg, server) -> None:
    plan, _ = _plan(tiny_cfg, server)
    msg = server_message(MessageType.EVALUATE, server.initial_state, plan.to_json())
    reply = client_app(msg, context(partition_id=0, num_partitions=3))
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["eval_ppl"] == pytest.approx(np.exp(metrics["eval_loss"]))
    assert metrics["eval_tokens"] > 0


def test_client_without_partition_config_errors(tiny_cfg, server) -> None:
    plan, _ = _plan(tiny_cfg, server)
    msg = server_message(MessageType.TRAIN, server.initial_state, plan.to_json())
    ctx = context()
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id and num-partitions"):
        client_app(msg, ctx)


def _state(value: float, shapes) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in shapes.items()}


def _strategy(cfg, shapes) -> FedPEAT:
    """A strategy over hand-made adapter shapes; the server's own training is off."""
    from dataclasses import replace
    from types import SimpleNamespace

    cfg = replace(cfg, strategy=replace(cfg.strategy, server_train=False))
    server = SimpleNamespace(
        initial_state=_state(0.0, shapes), adapter_layers=None, adapter_cfg=cfg.adapter
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


def test_short_reason_keeps_the_clientapp_message() -> None:
    from strategies.fedpeat_strategy import short_reason

    header = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:"
    trace = "<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n  File x\n"
    tail = "Exception ClientAppException occurred. Message: "
    ray = header + trace + tail + "partition.by='play' is not a column of the data; have []'>"
    assert short_reason(ray) == "partition.by='play' is not a column of the data; have []"
    assert short_reason("x" * 400).endswith("...") and len(short_reason("x" * 400)) == 300
