"""Hand-built Flower messages and contexts for app and strategy tests."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message

from fedpeat.protocol import ADAPTER_KEY, EMULATOR_KEY, METRICS_KEY, PLAN_KEY


def metadata(message_type: str, src: int = 1, dst: int = 2) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )


def arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def server_message(
    message_type: str,
    state: dict[str, np.ndarray],
    plan_json: str,
    emulator: dict[str, np.ndarray] | None = None,
) -> Message:
    content = RecordDict(
        {ADAPTER_KEY: arrays(state), PLAN_KEY: ConfigRecord({"plan": plan_json, "server-round": 1})}
    )
    if emulator is not None:
        content[EMULATOR_KEY] = arrays(emulator)
    return make_message(metadata(message_type), content)


def device_reply(
    node: int, state: dict[str, np.ndarray] | None, metrics: dict[str, float]
) -> Message:
    records: dict = {METRICS_KEY: MetricRecord(metrics)}
    if state is not None:
        records[ADAPTER_KEY] = arrays(state)
    return make_message(metadata("train", src=node, dst=0), RecordDict(records))


def error_reply(node: int, reason: str) -> Message:
    return make_message(metadata("train", src=node, dst=0), error=Error(code=1, reason=reason))


def context(partition_id: int = 0, num_partitions: int = 2) -> Context:
    return Context(
        run_id=1,
        node_id=partition_id + 10,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )
