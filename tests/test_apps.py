"""The ClientApp called with hand-built messages, and the strategy's validation and aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType

from client_app.app import app as client_app
from fedpeat.lora import state_shapes
from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY
from fedpeat.task import Plan, ServerModel
from strategies.fedlora import FedLoRA, from_record
from tests.helpers import context, device_reply, error_reply, server_message


@pytest.fixture(scope="module")
def server(tiny_cfg):
    return ServerModel(tiny_cfg)


def test_client_train_replies_with_a_trained_adapter(tiny_cfg, server) -> None:
    state = server.initial_state
    msg = server_message(MessageType.TRAIN, state, Plan.from_config(tiny_cfg, 1).to_json())
    reply = client_app(msg, context(partition_id=1, num_partitions=3))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    new_state = from_record(reply.content.array_records[ADAPTER_KEY])
    assert state_shapes(new_state) == state_shapes(state)
    assert any(not np.allclose(new_state[k], state[k]) for k in state)  # it trained
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train_loss"])
    assert metrics["train_s"] > 0 and metrics["peak_mem_mb"] > 0


def test_client_evaluate_reports_perplexity(tiny_cfg, server) -> None:
    msg = server_message(
        MessageType.EVALUATE, server.initial_state, Plan.from_config(tiny_cfg, 1).to_json()
    )
    reply = client_app(msg, context(partition_id=0, num_partitions=3))
    metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["eval_ppl"] == pytest.approx(np.exp(metrics["eval_loss"]))
    assert metrics["eval_tokens"] > 0


def test_client_without_partition_config_errors(tiny_cfg, server) -> None:
    msg = server_message(
        MessageType.TRAIN, server.initial_state, Plan.from_config(tiny_cfg, 1).to_json()
    )
    ctx = context()
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id and num-partitions"):
        client_app(msg, ctx)


def _state(value: float, shapes) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in shapes.items()}


def test_strategy_rejects_bad_replies_and_averages_the_rest(tiny_cfg) -> None:
    shapes = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
    strategy = FedLoRA(tiny_cfg, shapes)
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
    strategy = FedLoRA(tiny_cfg, {"x": (1,)})
    assert strategy.aggregate_train(2, [error_reply(1, "boom")]) == (None, None)
    assert strategy.stats[2].num_clients == 0


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture()
def server_identity(monkeypatch):
    """What the ServerApp runtime sets before `Message(...)` may be built outside it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_configure_train_samples_and_counts_bytes(tiny_cfg, server, server_identity) -> None:
    from dataclasses import replace

    from flwr.app import ConfigRecord

    from strategies.fedlora import to_record

    cfg = replace(tiny_cfg, strategy=replace(tiny_cfg.strategy, fraction_train=0.5))
    strategy = FedLoRA(cfg, state_shapes(server.initial_state))
    arrays = to_record(server.initial_state)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([11, 12, 13, 14])))
    assert len(messages) == 2
    assert {m.metadata.dst_node_id for m in messages} <= {11, 12, 13, 14}
    assert strategy.stats[1].bytes_down == 2 * arrays.count_bytes()
    plan = Plan.from_json(str(messages[0].content.config_records["plan"]["plan"]))
    assert plan.server_round == 1 and plan.model == cfg.model


def test_short_reason_keeps_the_clientapp_message() -> None:
    from strategies.fedlora import short_reason

    header = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:"
    trace = "<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n  File x\n"
    tail = "Exception ClientAppException occurred. Message: "
    ray = header + trace + tail + "partition.by='play' is not a column of the data; have []'>"
    assert short_reason(ray) == "partition.by='play' is not a column of the data; have []"
    assert short_reason("x" * 400).endswith("...") and len(short_reason("x" * 400)) == 300
