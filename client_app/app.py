"""fedpeat ClientApp: report a profile, train or evaluate the global adapter on this device.

The server sends the global adapter, a plan (resolved config, which emulator to use) and the
emulator's weights only when this device does not hold them; they are cached on disk by digest
(deployment starts a fresh process every round), as many as the device's disk budget allows
(least recently used go first), and each train reply says which it keeps. The device's
partition comes from its node config (`partition-id`, `num-partitions`); in deployment a node
may name its own data instead (`data-path`, `fedpeat.node_data`). Only adapter tensors
and that list travel back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedpeat.device import (
    check_budget,
    device_evaluate,
    device_profile,
    device_train,
    disk_budget_mb,
    held_emulators,
    keep_recent,
    receive_emulator,
)
from fedpeat.node_data import node_key_of
from fedpeat.protocol import (
    ADAPTER_KEY,
    CACHE_KEY,
    DATA_PATH,
    EMULATOR_KEY,
    HOLDS_FIELD,
    METRICS_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
    PLAN_FIELD,
    PLAN_KEY,
    PROFILE_KEY,
    RESIDUAL_KEY,
    Plan,
)

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    """The node's partition of the server's corpus; with its own data (`data-path`) the keys
    are optional and only name it (0 of 1 where absent)."""
    cfg = context.node_config
    if PARTITION_ID in cfg and NUM_PARTITIONS in cfg:
        return int(cfg[PARTITION_ID]), int(cfg[NUM_PARTITIONS])
    if _data_path(context):
        return 0, 1
    raise ValueError(
        "node config needs data-path (the node's own data) or partition-id and num-partitions "
        '(e.g. flower-supernode --node-config "partition-id=0 num-partitions=2")'
    )


def _data_path(context: Context) -> str:
    return str(context.node_config.get(DATA_PATH, ""))


def _node_key(context: Context) -> str:
    """Names this device's emulator cache; simulated devices share a disk, so it must differ.
    A node named by its data alone keeps one name across restarts."""
    cfg = context.node_config
    if PARTITION_ID not in cfg and _data_path(context):
        return node_key_of(_data_path(context))
    return f"device-{_partition(context)[0]}"


def _inputs(msg: Message, context: Context) -> tuple[Plan, int, int, dict[str, np.ndarray]]:
    plan = Plan.from_json(str(msg.content.config_records[PLAN_KEY][PLAN_FIELD]))
    partition_id, num_partitions = _partition(context)
    state = {k: v.numpy() for k, v in msg.content.array_records[ADAPTER_KEY].items()}
    return plan, partition_id, num_partitions, state


def _residual(msg: Message) -> dict[str, np.ndarray] | None:
    record = msg.content.array_records.get(RESIDUAL_KEY)
    return {k: v.numpy() for k, v in record.items()} if record is not None else None


def _store_emulator(msg: Message, plan: Plan, context: Context) -> None:
    """Store the emulator that came with the message, or mark the held one as used; then keep
    what the device's disk allows of the others (least recently used go first)."""
    budget = disk_budget_mb(plan, context.node_config)
    if EMULATOR_KEY in msg.content.array_records:
        tensors = {k: v.numpy() for k, v in msg.content.array_records[EMULATOR_KEY].items()}
        receive_emulator(plan.emulator.package(tensors), _node_key(context), budget)
    elif plan.emulator.digest:
        keep_recent(_node_key(context), plan.emulator.digest, budget)


def clip_update(
    new: dict[str, np.ndarray], start: Mapping[str, np.ndarray], norm: float
) -> dict[str, np.ndarray]:
    """Scale the update new - start to at most `norm` in L2 over every tensor together, with
    Flower's `compute_clip_model_update` (what its `fixedclipping_mod` does; the mod itself needs
    a message with a single ArrayRecord, and ours may also carry the emulator)."""
    keys = list(start)
    params = [np.array(new[k], dtype=np.float32) for k in keys]
    if all(np.array_equal(p, start[k]) for p, k in zip(params, keys, strict=True)):
        return dict(new)  # no update to clip (Flower's clipping divides by its norm)
    compute_clip_model_update(params, [np.asarray(start[k], dtype=np.float32) for k in keys], norm)
    return {**new, **dict(zip(keys, params, strict=True))}


@app.query()
def profile(msg: Message, context: Context) -> Message:
    partition_id, num_partitions = _partition(context)
    query = msg.content.config_records.get(PLAN_KEY)
    plan = Plan.from_json(str(query[PLAN_FIELD])) if query and PLAN_FIELD in query else None
    prof = device_profile(
        _node_key(context),
        partition_id,
        num_partitions,
        context.node_config,
        plan,
        _data_path(context),
    )
    return Message(RecordDict({PROFILE_KEY: ConfigRecord(prof)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    began = time.perf_counter()  # the whole handler: unpacking and loading count, not training only
    plan, partition_id, num_partitions, state = _inputs(msg, context)
    _store_emulator(msg, plan, context)
    check_budget(plan, context.node_config)
    args = (partition_id, num_partitions, state, _node_key(context), _residual(msg))
    # The received adapter's figure first, on the same loaded emulator: no second exchange.
    received = device_evaluate(plan, *args, _data_path(context))[0] if plan.evaluate_first else None
    new_state, result, num_examples = device_train(plan, *args, _data_path(context))
    if plan.clipping_norm > 0:  # client-side DP: the unclipped update never leaves the device
        new_state = clip_update(new_state, state, plan.clipping_norm)
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "train_loss": result.train_loss,
            "train_s": result.seconds,
            "train_tokens": result.tokens,
            "peak_mem_mb": result.peak_mem_mb,
            "gpu": result.gpu,
            "handler_s": time.perf_counter() - began,
            **(
                {
                    "received_eval_loss": received.loss,
                    "received_eval_tokens": received.tokens,
                    "received_eval_s": received.seconds,
                }
                if received is not None
                else {}
            ),
        }
    )
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in new_state.items()})
    # What the device keeps after the round, so the server sends none of it again.
    cache = ConfigRecord({HOLDS_FIELD: ",".join(held_emulators(_node_key(context)))})
    content = RecordDict({ADAPTER_KEY: arrays, METRICS_KEY: metrics, CACHE_KEY: cache})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    began = time.perf_counter()
    plan, partition_id, num_partitions, state = _inputs(msg, context)
    args = (partition_id, num_partitions, state, _node_key(context), _residual(msg))
    result, num_examples = device_evaluate(plan, *args, _data_path(context))
    metrics = MetricRecord(
        {
            "num-examples": num_examples,
            "eval_loss": result.loss,
            "eval_ppl": result.ppl,
            "eval_tokens": result.tokens,
            "handler_s": time.perf_counter() - began,
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)
