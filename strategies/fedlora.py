"""Federated LoRA strategy (Message API): sample devices, send the plan, validate, aggregate.

Unlike Flower's stock FedAvg, a malformed *successful* reply never raises here: every reply is
checked (content, keys, shapes, finite values, example count) and a bad one is rejected with a
reason that lands in metrics.jsonl. A round without any valid reply keeps the previous adapter.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeat.config import Config
from fedpeat.lora import AdapterStateError, check_adapter_state
from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY, PLAN_KEY
from fedpeat.task import Plan
from strategies.aggregation import weighted_average, weighted_mean

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful line of a device error: Ray wraps the ClientApp's exception in tracebacks."""
    text = _ANSI.sub("", reason or "unknown error")
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.split()).rstrip("'>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@dataclass
class RoundStats:
    """What the strategy saw in one round; the ServerApp merges it into the metrics row."""

    num_sampled: int = 0
    num_clients: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    device_ppl: float | None = None
    client_train_s: list[float] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return {
            "num_sampled": self.num_sampled,
            "num_clients": self.num_clients,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "train_loss": self.train_loss,
            "device_ppl": self.device_ppl,
            "client_train_s_max": max(self.client_train_s, default=None),
            "rejected": self.rejected,
        }


class FedLoRA(Strategy):
    """Example-weighted federated averaging of LoRA adapters with per-reply validation."""

    def __init__(self, cfg: Config, shapes: dict[str, tuple[int, ...]]) -> None:
        self.cfg = cfg
        self.shapes = shapes
        self.rng = random.Random(cfg.seed)
        self.stats: dict[int, RoundStats] = {}

    # ------------------------------------------------------------------ helpers

    def _nodes(self, grid: Grid, fraction: float) -> list[int]:
        """Wait for `min_nodes` devices, then sample `fraction` of the connected ones (seeded)."""
        need = self.cfg.strategy.min_nodes
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if waited % 10 == 0:
                log(INFO, "waiting for devices: %d connected, %d needed", len(nodes), need)
            time.sleep(1.0)
            waited += 1.0
        k = max(1, round(len(nodes) * fraction))
        return sorted(self.rng.sample(nodes, k))

    def _messages(
        self, server_round: int, arrays: ArrayRecord, node_ids: list[int], message_type: str
    ) -> list[Message]:
        plan = Plan.from_config(self.cfg, server_round)
        config = ConfigRecord({"plan": plan.to_json(), "server-round": server_round})
        return [
            Message(
                RecordDict({ADAPTER_KEY: arrays, PLAN_KEY: config}),
                dst_node_id=node,
                message_type=message_type,
            )
            for node in node_ids
        ]

    def _stats(self, server_round: int) -> RoundStats:
        return self.stats.setdefault(server_round, RoundStats())

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._nodes(grid, self.cfg.strategy.fraction_train)
        stats = self._stats(server_round)
        stats.num_sampled = len(nodes)
        stats.bytes_down += arrays.count_bytes() * len(nodes)
        log(INFO, "round %d: training on %d device(s)", server_round, len(nodes))
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN)

    def validate_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], float, float] | str:
        """(state, weight, train_loss) of a usable reply, or the reason it is rejected."""
        if msg.has_error():
            return f"device error: {short_reason(msg.error.reason or '')}"
        content = msg.content
        if ADAPTER_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            return f"reply lacks '{ADAPTER_KEY}' arrays or '{METRICS_KEY}' metrics"
        metrics = content.metric_records[METRICS_KEY]
        weight = metrics.get("num-examples")
        loss = metrics.get("train_loss")
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return f"num-examples must be a positive number, got {weight!r}"
        if not isinstance(loss, (int, float)) or not np.isfinite(loss):
            return f"train_loss must be a finite number, got {loss!r}"
        try:
            state = from_record(content.array_records[ADAPTER_KEY])
            check_adapter_state(self.shapes, state)
        except (AdapterStateError, ValueError, TypeError) as err:
            return f"invalid adapter: {err}"
        return state, float(weight), float(loss)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self._stats(server_round)
        states, weights, losses = [], [], []
        for msg in replies:
            if msg.has_content():
                stats.bytes_up += sum(r.count_bytes() for r in msg.content.array_records.values())
            checked = self.validate_reply(msg)
            if isinstance(checked, str):
                node = msg.metadata.src_node_id
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    node,
                    checked,
                )
                stats.rejected.append({"node": node, "reason": checked})
                continue
            state, weight, loss = checked
            states.append(state)
            weights.append(weight)
            losses.append(loss)
            seconds = msg.content.metric_records[METRICS_KEY].get("train_s")
            if isinstance(seconds, (int, float)):
                stats.client_train_s.append(float(seconds))
        stats.num_clients = len(states)
        if not states:
            log(WARNING, "round %d: no valid reply; keeping the previous adapter", server_round)
            return None, None
        stats.train_loss = weighted_mean(losses, weights)
        merged = weighted_average(states, weights)
        return to_record(merged), MetricRecord({"train_loss": stats.train_loss})

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.cfg.strategy.fraction_evaluate <= 0:
            return []
        nodes = self._nodes(grid, self.cfg.strategy.fraction_evaluate)
        self._stats(server_round).bytes_down += arrays.count_bytes() * len(nodes)
        return self._messages(server_round, arrays, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        losses, tokens = [], []
        for msg in replies:
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            loss, count = m.get("eval_loss"), m.get("eval_tokens")
            if (
                isinstance(loss, (int, float))
                and np.isfinite(loss)
                and isinstance(count, (int, float))
                and count > 0
            ):
                losses.append(float(loss))
                tokens.append(float(count))
        if not losses:
            return None
        # Pool the token NLL across devices, then exponentiate: a token-weighted perplexity.
        ppl = float(np.exp(weighted_mean(losses, tokens)))
        self._stats(server_round).device_ppl = ppl
        return MetricRecord({"device_ppl": ppl})

    def summary(self) -> None:
        s = self.cfg.strategy
        log(
            INFO,
            "FedLoRA: aggregation=%s fraction_train=%.2f fraction_evaluate=%.2f min_nodes=%d",
            s.aggregation,
            s.fraction_train,
            s.fraction_evaluate,
            s.min_nodes,
        )
