"""The ClientApp called with hand-built messages."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import MessageType

import fedpeat.device as dev
from client_app.app import app as client_app
from fedpeat.lora import state_shapes
from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY, EmulatorRef, Plan
from fedpeat.server_model import ServerModel
from strategies.round_stats import from_record
from tests.helpers import context, plan_of, server_message


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test's device starts as a fresh ClientApp process: no emulator in memory that a
    whole run earlier in this pytest process loaded (the disk is all the device has)."""
    monkeypatch.setattr(dev, "_EMULATORS", OrderedDict())


@pytest.fixture(scope="module")
def server(tiny_cfg):
    return ServerModel(tiny_cfg)


def _plan(cfg, server, level: float | None = None) -> tuple[Plan, dict | None]:
    """The plan the strategy would send, and the emulator tensors if it sends one."""
    ref, tensors = EmulatorRef(), None
    if level is not None:
        pkg = server.package(level)
        ref, tensors = EmulatorRef.of(pkg), pkg.state
    plan = plan_of(cfg, 1, ref, server.adapter_layers)
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
    assert metrics["gpu"] == -1  # trained on the CPU
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


@pytest.mark.parametrize("first", [True, False])
def test_train_reply_carries_the_received_adapters_figure(
    tiny_cfg, server, first, tmp_path, monkeypatch
) -> None:
    """`evaluate_first`: the train reply carries the perplexity of the adapter it received, the
    figure an evaluate exchange gives for that adapter; without it, no such figure."""
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))
    plan, emulator = _plan(tiny_cfg, server, 0.5)
    plan.evaluate_first = first
    state = {k: v + 0.01 for k, v in server.initial_state.items()}  # B != 0: a trained adapter
    ctx = context(partition_id=1, num_partitions=3)
    train = client_app(server_message(MessageType.TRAIN, state, plan.to_json(), emulator), ctx)
    metrics = train.content.metric_records[METRICS_KEY]
    if not first:
        assert "received_eval_loss" not in metrics
        return
    ev = client_app(server_message(MessageType.EVALUATE, state, plan.to_json()), ctx)
    expected = ev.content.metric_records[METRICS_KEY]
    assert metrics["received_eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    assert metrics["received_eval_tokens"] == expected["eval_tokens"] > 0
    assert 0 < metrics["received_eval_s"] < metrics["handler_s"]


def test_client_without_partition_config_errors(tiny_cfg, server) -> None:
    plan, _ = _plan(tiny_cfg, server)
    msg = server_message(MessageType.TRAIN, server.initial_state, plan.to_json())
    ctx = context()
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id and num-partitions"):
        client_app(msg, ctx)
