"""What one round did, as the server records it: per-device rows, the round's figures, and the
bytes each message carries on the wire (the communication figures)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedpeat.protocol import METRICS_KEY
from strategies.aggregation import weighted_mean

if TYPE_CHECKING:  # planning puts adapters into records with this module's helpers
    from strategies.planning import DevicePlan


def _scalar_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_scalar_bytes(v) for v in value)
    return 1 if isinstance(value, bool) else 8  # numbers travel as 64-bit


def content_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message (arrays, configs, metrics): what goes on the wire.

    Config and metric values are sized here rather than with Flower's `count_bytes`, which
    raises on an empty string or list (a device's reply must never crash the accounting).
    """
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    scalars = sum(
        len(k) + _scalar_bytes(v) for r in content.config_records.values() for k, v in r.items()
    )
    scalars += sum(
        len(k) + _scalar_bytes(v) for r in content.metric_records.values() for k, v in r.items()
    )
    return int(arrays + scalars)


def to_record(state: dict[str, np.ndarray], consume: bool = False) -> ArrayRecord:
    """`state` as a Flower record; `consume` empties `state` tensor by tensor as it goes, so
    a large one (an emulator package) is not held twice."""
    if not consume:
        return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    arrays = {}
    for key in list(state):
        arrays[key] = Array(np.ascontiguousarray(state.pop(key)))
    return ArrayRecord(array_dict=arrays)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


@dataclass
class DeviceRound:
    """One device's part in one round (a row of `devices` in metrics.jsonl)."""

    node: int
    partition: int
    level: float
    emulator_sent: bool
    bytes_down: int
    bytes_up: int = 0
    train_loss: float | None = None
    examples: int = 0
    train_s: float | None = None
    handler_s: float | None = None
    """Seconds in the ClientApp's train handler (loading the emulator, training, packing)."""
    peak_mem_mb: float | None = None
    """Its training's peak: the process's resident set on a CPU, the CUDA allocator's on a GPU."""
    gpu: int | None = None
    """The CUDA device index it trained on as its process numbers them (-1: the CPU)."""
    received_loss: float | None = None
    received_tokens: float | None = None
    """`strategy.evaluate_received`: the device's held-out NLL per token (and tokens) of the
    adapter it received, measured on its emulator before training."""
    status: str = "sent"
    rank: int = 0
    batch: int = 0
    bits: int = 0
    modules: list[str] = field(default_factory=list)
    """Planner runs: the plan (rank, batch, bits, modules) and its estimates."""
    est_memory_mb: float | None = None
    est_time_s: float | None = None
    update_norm: float | None = None
    """L2 norm of the update it returned (reply minus what it received)."""
    round_trip_s: float | None = None
    link_bps: float | None = None
    """Measured links (`devices.measure_links`): seconds from sending to its reply, and its
    link's effective throughput measured so far (None: not measured, the link figures price
    it)."""
    priced_by: str = "link figures"
    """What the cost model priced this round's transfers with: `measured` (the node's measured
    throughput, from its earlier exchanges) or `link figures` (its configured or profiled
    bandwidth, power and distance)."""

    def priced_with(self, measured_bps: float) -> None:
        """Note what priced this round: the throughput the node's profile carried (0: none)."""
        self.priced_by = "measured" if measured_bps > 0 else "link figures"

    @classmethod
    def sent(
        cls,
        node: int,
        partition: int,
        level: float,
        emulator_sent: bool,
        bytes_down: int,
        plan: DevicePlan | None = None,
    ) -> DeviceRound:
        """The row of a device sent work, with its FedPipe `plan` when it has one."""
        row = cls(node, partition, level, emulator_sent, bytes_down)
        if plan is not None:
            row.rank, row.batch, row.bits = plan.rank, plan.batch, plan.bits
            row.modules = list(plan.modules)
            row.est_memory_mb, row.est_time_s = plan.memory_mb, plan.time_s
        return row


@dataclass
class RoundStats:
    """What the strategy saw in one round; the ServerApp merges it into the metrics row."""

    num_sampled: int = 0
    num_clients: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    exchanges: int = 0
    emulator_bytes: int = 0
    train_loss: float | None = None
    server_train_loss: float | None = None
    emulator_ppl: float | None = None
    truncation_error: float | None = None
    """`exact` aggregation: the largest ||dW - B A||_F over modules (Frobenius norm)."""
    action: dict[int, float | None] = field(default_factory=dict)
    """Node -> level it was given, None: skipped (the controller's or emulator.case's choice)."""
    latency_s: float | None = None
    """Modelled round latency: max over devices of transmission + compute (cost model)."""
    swaps: int = 0
    violations: int = 0
    """Devices chosen that could not hold their level, swaps beyond the share, failed devices."""
    reward: float | None = None
    decided: str | None = None
    """How the controller chose this round's action: `ppo-sampled` / `ppo-greedy`, or the rule's
    name (`oort`, `greedy`, ...); None without a controller."""
    devices: dict[int, DeviceRound] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Profiles first heard this round: the node's report, the figures used, what was assumed."""
    rejoined: dict[int, int] = field(default_factory=dict)
    """New node id -> the id the same device (partition) had before it left and came back."""
    privacy: dict[str, Any] | None = None
    """privacy.enabled: clipping, noise std, devices averaged, epsilon spent so far at delta."""
    timing: dict[str, float] = field(default_factory=dict)
    """Server-side seconds per phase: configure (planning, packaging), profile (the query
    exchange), train_exchange and evaluate_exchange (sent until every reply is in: the devices'
    work plus Flower's transport), server_train, aggregate; client_eval_sum: the devices'
    evaluate handlers."""

    def trained(self, node: int, weight: float, metrics: dict[str, Any]) -> None:
        """`node` trained validly: its row takes the figures it reported."""
        if dev := self.devices.get(node):
            dev.status, dev.train_loss, dev.examples = (
                "ok",
                float(metrics["train_loss"]),
                int(weight),
            )
            dev.train_s = finite(metrics.get("train_s"))
            dev.handler_s = finite(metrics.get("handler_s"))
            dev.peak_mem_mb = finite(metrics.get("peak_mem_mb"))
            gpu = finite(metrics.get("gpu"))
            dev.gpu = None if gpu is None else int(gpu)
            loss, tokens = (
                finite(metrics.get("received_eval_loss")),
                finite(metrics.get("received_eval_tokens")),
            )
            if loss is not None and tokens is not None and tokens > 0:
                dev.received_loss, dev.received_tokens = loss, tokens

    def received_emulator_ppl(self) -> float | None:
        """The devices' perplexity of the adapter they received this round (the previous
        round's global adapter) on their emulators: token NLL pooled over the devices that
        trained validly, exponentiated; None when none measured it."""
        pairs = [
            (d.received_loss, d.received_tokens)
            for d in self.devices.values()
            if d.status == "ok" and d.received_loss is not None and d.received_tokens
        ]
        if not pairs:
            return None
        return float(np.exp(weighted_mean([p[0] for p in pairs], [p[1] for p in pairs])))

    def pool_evaluations(self, replies: Iterable[Message]) -> float | None:
        """The devices' evaluate replies: bytes, handler seconds, and the emulator perplexity
        (token NLL pooled over devices, then exponentiated: a token-weighted perplexity)."""
        losses, tokens = [], []
        for msg in replies:
            if msg.has_content():
                self.bytes_up += content_bytes(msg.content)
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            handler = finite(m.get("handler_s")) or 0.0
            self.timing["client_eval_sum"] = self.timing.get("client_eval_sum", 0.0) + handler
            loss, count = finite(m.get("eval_loss")), finite(m.get("eval_tokens"))
            if loss is not None and count is not None and count > 0:
                losses.append(loss)
                tokens.append(count)
        if not losses:
            return None
        self.emulator_ppl = float(np.exp(weighted_mean(losses, tokens)))
        return self.emulator_ppl

    def as_row(self) -> dict[str, Any]:
        return {
            "num_sampled": self.num_sampled,
            "num_clients": self.num_clients,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "exchanges": self.exchanges,
            "emulator_bytes": self.emulator_bytes,
            "train_loss": self.train_loss,
            "server_train_loss": self.server_train_loss,
            "emulator_ppl": self.emulator_ppl,
            "received_emulator_ppl": self.received_emulator_ppl(),
            "truncation_error": self.truncation_error,
            "action": {str(n): lv for n, lv in self.action.items()},
            "latency_s": self.latency_s,
            "swaps": self.swaps,
            "violations": self.violations,
            "reward": self.reward,
            "decided": self.decided,
            "client_train_s_max": max(
                (d.train_s for d in self.devices.values() if d.train_s is not None), default=None
            ),
            "devices": [vars(d) for d in self.devices.values()],
            "skipped": self.skipped,
            "rejected": self.rejected,
            "profiles": {str(n): p for n, p in self.profiles.items()},
            "rejoined": {str(n): old for n, old in self.rejoined.items()},
            "privacy": self.privacy,
            "timing": self.timing,
        }


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (a device's reply may hold anything)."""
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None
