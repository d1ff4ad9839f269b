"""Hand-built Flower messages, contexts and plans for app, device and strategy tests, and
helpers shared by several test modules."""

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

from fedpeat.config import Config
from fedpeat.protocol import ADAPTER_KEY, EMULATOR_KEY, METRICS_KEY, PLAN_KEY, EmulatorRef, Plan


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


def plan_of(
    cfg: Config,
    server_round: int = 0,
    emulator: EmulatorRef | None = None,
    adapter_layers: list[int] | None = None,
) -> Plan:
    """A device's plan straight from the config, without a server (`build_plan` needs one)."""
    return Plan(
        cfg.model,
        cfg.data,
        cfg.partition,
        cfg.adapter,
        cfg.train,
        emulator or EmulatorRef(),
        adapter_layers,
        cfg.seed,
        server_round,
    )


def adapter_of(msg: Message) -> dict[str, np.ndarray]:
    """The adapter a message carries."""
    return {k: v.numpy() for k, v in msg.content.array_records[ADAPTER_KEY].items()}


def with_adapter(reply: Message, state: dict[str, np.ndarray]) -> Message:
    """`reply` carrying `state` as its adapter instead."""
    reply.content[ADAPTER_KEY] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return reply


def final_state(run_dir) -> dict[str, np.ndarray]:
    """The adapter a run's checkpoint holds."""
    from server_app.checkpoint import load_checkpoint

    return {k: np.asarray(v) for k, v in load_checkpoint(run_dir).state.items()}


def hand_env():  # type: ignore[no-untyped-def]
    """An edge environment small enough to work out by hand (tests of the environment and of
    the controllers acting on it)."""
    from fedpeat.config import ControllerConfig, DeviceProfile
    from fedpeat.cost import Level
    from strategies.control.edge_env import EdgeEnv

    # Device 0: 1000 MB, 10 GFLOP/s, 1 MHz, 20 dBm, 100 m. Device 1: 400 MB (fits level 1 only).
    profiles = [
        DeviceProfile("a", 1000, 10.0, 1.0, 20.0, 100.0),
        DeviceProfile("b", 400, 5.0, 0.5, 10.0, 200.0),
    ]
    levels = [Level(0.5, 0.1, 1e8, 10**8, 600.0), Level(0.25, 0.01, 5e7, 5 * 10**7, 300.0)]
    cfg = ControllerConfig(
        name="ppo",
        w_ppl=1.0,
        w_latency=0.01,
        w_swaps=0.5,
        memory_penalty=2.0,
        swap_penalty=1.0,
        swap_share=0.25,
        episode_rounds=3,
        floor_share=0.5,
        eta=1.0,
        beta=1.0,
        tokens=1000,
        adapter_bytes=1e6,
        ppl_full=100.0,
    )
    return EdgeEnv(profiles, levels, cfg, data_shares=[0.25, 0.75])


def pids_under(flwr_home: object, *needles: str) -> list[int]:
    """Live processes started under `flwr_home` (their FLWR_HOME) whose command line holds
    every one of `needles`."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in env and all(n.encode() in cmd for n in needles):
            found.append(int(entry.name))
    return found
