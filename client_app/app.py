"""fedpeat ClientApp: train or evaluate the global LoRA adapter on this device's data.

The server sends the global adapter and a plan (resolved config); the device's partition comes
from its node config (`partition-id`, `num-partitions`). Only adapter tensors travel.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY, PLAN_KEY
from fedpeat.task import Plan, device_evaluate, device_train

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError(
            "node config needs partition-id and num-partitions "
            '(e.g. flower-supernode --node-config "partition-id=0 num-partitions=2")'
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def _inputs(msg: Message, context: Context) -> tuple[Plan, int, int, dict[str, np.ndarray]]:
    plan = Plan.from_json(str(msg.content.config_records[PLAN_KEY]["plan"]))
    partition_id, num_partitions = _partition(context)
    state = {k: v.numpy() for k, v in msg.content.array_records[ADAPTER_KEY].items()}
    return plan, partition_id, num_partitions, state


@app.train()
def train(msg: Message, context: Context) -> Message:
    plan, partition_id, num_partitions, state = _inputs(msg, context)
    new_state, result, num_examples = device_train(plan, partition_id, num_partitions, state)
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "train_loss": result.train_loss,
            "train_s": result.seconds,
            "train_tokens": result.tokens,
            "peak_mem_mb": result.peak_mem_mb,
        }
    )
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in new_state.items()})
    content = RecordDict({ADAPTER_KEY: arrays, METRICS_KEY: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    plan, partition_id, num_partitions, state = _inputs(msg, context)
    result, num_examples = device_evaluate(plan, partition_id, num_partitions, state)
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "eval_loss": result.loss,
            "eval_ppl": result.ppl,
            "eval_tokens": result.tokens,
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)
