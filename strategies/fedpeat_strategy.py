"""FedPEAT strategy (Message API): profiles, per-device emulator plans, validation, aggregation.

Each round: sample devices; give each the emulator level its memory allows (case 1), the shared
one (case 2) or the full model (case 3); send the emulator's weights only to devices that do not
hold that digest; validate every reply (a malformed *successful* reply never raises here, unlike
Flower's stock FedAvg); let the server train on its own data too; average the adapters weighted
by examples. A round without any valid update keeps the previous adapter.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from pathlib import Path
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

from fedpeat.config import Config, DeviceProfile
from fedpeat.data import partition_sizes
from fedpeat.lora import AdapterStateError, check_adapter_state, state_shapes
from fedpeat.protocol import ADAPTER_KEY, EMULATOR_KEY, METRICS_KEY, PLAN_KEY, PROFILE_KEY
from fedpeat.task import EmulatorRef, Plan, ServerModel
from strategies.aggregation import (
    device_share,
    exact_aggregate,
    partial_average,
    weighted_average,
    weighted_mean,
)
from strategies.assign import Assignment, assign_levels
from strategies.edge_env import Level
from strategies.online import OnlineControl
from strategies.planning import DevicePlan, plan_devices, profile_of, smallest_need_mb

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Device errors that mean "I do not hold that emulator (any more)": resend it next time.
_CACHE_MISS = ("not in the device cache", "was corrupt")


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful line of a device error: Ray wraps the ClientApp's exception in tracebacks."""
    text = _ANSI.sub("", reason or "unknown error")
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.split()).rstrip("'>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


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
    peak_mem_mb: float | None = None
    status: str = "sent"
    rank: int = 0
    batch: int = 0
    bits: int = 0
    modules: list[str] = field(default_factory=list)
    """Planner runs: the plan (rank, batch, bits, modules) and its estimates."""
    est_memory_mb: float | None = None
    est_time_s: float | None = None


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
    devices: dict[int, DeviceRound] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Profiles first heard this round: the node's report, the figures used, what was assumed."""

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
            "truncation_error": self.truncation_error,
            "action": {str(n): lv for n, lv in self.action.items()},
            "latency_s": self.latency_s,
            "swaps": self.swaps,
            "violations": self.violations,
            "reward": self.reward,
            "client_train_s_max": max(
                (d.train_s for d in self.devices.values() if d.train_s is not None), default=None
            ),
            "devices": [vars(d) for d in self.devices.values()],
            "skipped": self.skipped,
            "rejected": self.rejected,
            "profiles": {str(n): p for n, p in self.profiles.items()},
        }


class FedPEAT(Strategy):
    """Emulator-assisted federated LoRA with per-reply validation and server collaboration."""

    def __init__(self, cfg: Config, server: ServerModel, checkpoint: Path | None = None) -> None:
        self.cfg = cfg
        self.server = server
        self.control = OnlineControl(
            cfg,
            checkpoint,
            float(sum(v.nbytes for v in server.initial_state.values())),
            cfg.strategy.name == "fed_ft",
        )
        self.shapes = state_shapes(server.initial_state)
        self.rng = random.Random(cfg.seed)
        self.stats: dict[int, RoundStats] = {}
        self.profiles: dict[int, dict[str, Any]] = {}
        self.device_profiles: dict[int, DeviceProfile] = {}
        self.holdings: dict[int, set[str]] = {}
        self.state: dict[str, np.ndarray] = dict(server.initial_state)
        self._plans: dict[int, Plan] = {}
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}
        # What each device of the round started from (its share), for the update average.
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self._data_sizes: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ devices

    def _connected(self, grid: Grid) -> list[int]:
        need, waited = self.cfg.strategy.min_nodes, 0
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if waited % 10 == 0:
                log(INFO, "waiting for devices: %d connected, %d needed", len(nodes), need)
            time.sleep(1.0)
            waited += 1
        return nodes

    def _profiles(self, grid: Grid, nodes: list[int], stats: RoundStats) -> None:
        """Ask devices we have not heard from for their profile (partition, memory, holdings)."""
        missing = [n for n in nodes if n not in self.profiles]
        if not missing:
            return
        # The plan tells a device which data config to count its training examples under.
        query = ConfigRecord({"ask": "profile", "plan": Plan.from_config(self.cfg, 0).to_json()})
        msgs = [
            Message(
                RecordDict({PLAN_KEY: query}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in missing
        ]
        stats.bytes_down += sum(content_bytes(m.content) for m in msgs)
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.strategy.round_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_content():
                stats.bytes_up += content_bytes(reply.content)
            if reply.has_error() or PROFILE_KEY not in reply.content.config_records:
                log(
                    WARNING,
                    "node %d sent no profile: %s",
                    node,
                    short_reason(
                        (reply.error.reason if reply.has_error() else None) or "no profile"
                    ),
                )
                continue
            prof: dict[str, Any] = dict(reply.content.config_records[PROFILE_KEY])
            # What a node does not report about itself comes from the devices= profile.
            profiles = self.cfg.devices.profiles
            sim = profiles[int(prof["partition-id"]) % len(profiles)]
            device, assumed = profile_of(prof, sim, self.cfg.devices.from_nodes)
            self.device_profiles[node] = device
            prof["memory-mb"] = device.memory_mb
            prof["profile"] = device.name
            self.profiles[node] = prof
            stats.profiles[node] = {**prof, **vars(device), "assumed": assumed}
            self.holdings[node] = {d for d in str(prof.get("holds", "")).split(",") if d}

    def _sample(self, nodes: list[int], fraction: float) -> list[int]:
        k = max(1, round(len(nodes) * fraction))
        return sorted(self.rng.sample(nodes, min(k, len(nodes))))

    def assign(self, nodes: list[int]) -> dict[int, Assignment]:
        e = self.cfg.emulator
        budgets = {n: float(self.profiles[n]["memory-mb"]) for n in nodes}
        if self.cfg.planner.enabled:  # the level the cheapest plan fits; the program does the rest
            out: dict[int, Assignment] = {}
            for n in nodes:
                prof = self.device_profiles[n]
                out |= assign_levels(
                    e.case,
                    {n: budgets[n]},
                    list(e.levels),
                    e.shared_level,
                    lambda lv, p=prof: smallest_need_mb(self.server, lv, p),  # type: ignore[misc]
                )
            return out
        return assign_levels(
            e.case, budgets, list(e.levels), e.shared_level, self.server.memory_need_mb
        )

    def _levels(self) -> list[Level]:
        """The server's emulator levels as the controller prices them (real sizes and needs;
        fidelity from the configured retention curve when it is this model's)."""
        c, wire = self.cfg.controller, getattr(np, self.cfg.emulator.wire_dtype)
        curve = {p.keep: p for p in c.curve} if c.curve_model == self.cfg.model.name else {}
        keeps = list(self.cfg.emulator.levels)
        if self.cfg.emulator.case == 3 and 1.0 not in keeps:  # devices train the full model
            keeps.append(1.0)
        out = []
        for keep in keeps:
            shape = self.server.emulator_shape(keep)
            fidelity = min(1.0, c.ppl_full / curve[keep].ppl) if keep in curve else keep
            out.append(
                Level(
                    keep,
                    fidelity,
                    float(shape.params * np.dtype(wire).itemsize),
                    shape.params,
                    self.server.memory_need_mb(keep),
                )
            )
        return out

    def _fits(self, node: int, level: float) -> float | None:
        """None if the device can hold `level`, else the memory it would need."""
        prof = self.device_profiles[node]
        need = (
            smallest_need_mb(self.server, level, prof)
            if self.cfg.planner.enabled
            else self.server.memory_need_mb(level)
        )
        return None if need <= prof.memory_mb else need

    def _controlled(self, options: dict[int, int]) -> tuple[dict[int, Assignment], int]:
        """The controller's options as assignments; a level the device cannot hold is not sent
        (a violation, as in the environment)."""
        out, violations = {}, 0
        for node, option in options.items():
            if option == 0:
                out[node] = Assignment(None, f"{self.cfg.controller.name}: not chosen this round")
                continue
            level = self.cfg.emulator.levels[option - 1]
            need = self._fits(node, level)
            if need is None:
                out[node] = Assignment(level)
            else:
                violations += 1
                out[node] = Assignment(
                    None,
                    f"{self.cfg.controller.name} chose keep {level}, which needs {need:.0f} MB "
                    f"> budget {self.device_profiles[node].memory_mb:.0f} MB: not sent",
                )
        return out, violations

    def _holding(self) -> list[int]:
        return self.control.holding(self.holdings, self.server.package_digests())

    def _data_size(self, node: int) -> int:
        """The device's training examples (the planner's data term): what it reported, else its
        partition's size under the shared data seed."""
        if int(self.profiles[node].get("data-size", 0)) > 0:
            return int(self.profiles[node]["data-size"])
        n = int(self.profiles[node]["num-partitions"])
        if n not in self._data_sizes:
            self._data_sizes[n] = partition_sizes(self.cfg.data, self.cfg.partition, n)
        return self._data_sizes[n][int(self.profiles[node]["partition-id"])]

    def _plan(self, levels: dict[int, float]) -> dict[int, DevicePlan | str]:
        """FedPipe plans for the devices in `levels`: rank, batch, bits, modules per device."""
        case3 = self.cfg.emulator.case == 3
        return plan_devices(
            self.cfg,
            self.server,
            levels,
            {n: self.device_profiles[n] for n in levels},
            {n: self._data_size(n) for n in levels},
            {n: 0.0 if case3 else float(self._emulator_bytes(n, lv)) for n, lv in levels.items()},
        )

    def _emulator_bytes(self, node: int, level: float) -> int:
        pkg = self.server.package(level)
        return 0 if pkg.digest in self.holdings.get(node, set()) else pkg.nbytes

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._connected(grid)
        stats = self.stats.setdefault(server_round, RoundStats())
        self._profiles(grid, nodes, stats)
        sampled = [
            n for n in self._sample(nodes, self.cfg.strategy.fraction_train) if n in self.profiles
        ]
        stats.num_sampled = len(sampled)
        self.state = from_record(arrays)
        self._plans, self._expected, self._received = {}, {}, {}
        messages = []
        known = [n for n in nodes if n in self.profiles]
        if not self.control.levels:
            self.control.levels = self._levels()
        self.control.start(
            sorted(known, key=lambda n: int(self.profiles[n]["partition-id"])),
            self.device_profiles,
            {n: self._data_size(n) for n in known},
        )
        options = self.control.act(self._holding())
        violations = 0
        if options is None:
            assignments = self.assign(sampled)
        else:
            assignments, violations = self._controlled(options)
        levels = {n: a.level for n, a in assignments.items() if a.level is not None}
        plans = self._plan(levels) if self.cfg.planner.enabled else {}
        for node, assignment in assignments.items():
            device_plan = plans.get(node)
            if assignment.level is None or isinstance(device_plan, str):
                reason = assignment.reason or str(device_plan)
                stats.skipped.append({"node": node, "reason": reason})
                continue
            adapter_record = arrays
            if device_plan is not None:
                share = device_share(
                    self.state,
                    device_plan.modules,
                    device_plan.rank,
                    self.cfg.strategy.aggregation == "exact",
                    self.server.initial_state,
                )
                adapter_record = to_record(share)
                self._received[node] = share
            self._expected[node] = state_shapes(from_record(adapter_record))
            content = RecordDict({ADAPTER_KEY: adapter_record})
            ref, sent_bytes = EmulatorRef(), 0
            if self.cfg.emulator.case != 3:
                pkg = self.server.package(assignment.level)
                ref = EmulatorRef.of(pkg)
                if pkg.digest not in self.holdings.get(node, set()):
                    emulator_record = to_record(pkg.state)
                    content[EMULATOR_KEY] = emulator_record
                    sent_bytes = emulator_record.count_bytes()
                    stats.exchanges += 1
                    stats.emulator_bytes += sent_bytes
            plan = Plan.from_config(self.cfg, server_round, ref)
            plan.full_finetune = self.server.full_ft
            plan.adapter_layers = self.server.adapter_layers
            if device_plan is not None:
                plan.adapter = self.server.device_adapter(device_plan.rank, device_plan.share)
                plan.train = replace(plan.train, batch_size=device_plan.batch)
                plan.bits = device_plan.bits
                plan.compute_dtype = device_plan.compute_dtype
            content[PLAN_KEY] = ConfigRecord({"plan": plan.to_json(), "server-round": server_round})
            self._plans[node] = plan
            down = content_bytes(content)
            stats.bytes_down += down
            row = DeviceRound(
                node,
                int(self.profiles[node]["partition-id"]),
                assignment.level,
                sent_bytes > 0,
                down,
            )
            if device_plan is not None:
                row.rank, row.batch, row.bits = (
                    device_plan.rank,
                    device_plan.batch,
                    device_plan.bits,
                )
                row.modules = list(device_plan.modules)
                row.est_memory_mb, row.est_time_s = device_plan.memory_mb, device_plan.time_s
            stats.devices[node] = row
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        levels_sent = {n: d.level for n, d in stats.devices.items()}
        stats.action = {n: levels_sent.get(n) for n in sorted(assignments)}
        # Holdings as they were before this round (replies update them); now that this round's
        # packages exist, a device that already holds its level is recognised by the digest.
        holding = self._holding()
        keeps = [lv.keep for lv in self.control.levels]
        sent = {n: keeps.index(lv) + 1 for n, lv in levels_sent.items() if lv in keeps}
        if self.cfg.emulator.case == 3:  # devices hold the full model: nothing to download
            holding = [sent.get(n, 0) for n in self.control.nodes]
        priced = self.control.price(sent, holding, violations).outcome
        stats.latency_s, stats.swaps = priced.latency_s, priced.swaps
        stats.violations = priced.memory_violations + priced.swap_violations
        log(
            INFO,
            "round %d: %d device(s) train, %d skipped, %d emulator(s) sent (%.1f MB)",
            server_round,
            len(messages),
            len(stats.skipped),
            stats.exchanges,
            stats.emulator_bytes / 2**20,
        )
        return messages

    def validate_reply(
        self, msg: Message
    ) -> tuple[dict[str, np.ndarray], float, dict[str, Any]] | str:
        """(state, weight, metrics) of a usable reply, or the reason it is rejected."""
        if msg.has_error():
            return f"device error: {short_reason(msg.error.reason or '')}"
        content = msg.content
        if ADAPTER_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            return f"reply lacks '{ADAPTER_KEY}' arrays or '{METRICS_KEY}' metrics"
        metrics = dict(content.metric_records[METRICS_KEY])
        weight, loss = metrics.get("num-examples"), metrics.get("train_loss")
        if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            return f"num-examples must be a positive number, got {weight!r}"
        if not isinstance(loss, (int, float)) or not np.isfinite(loss):
            return f"train_loss must be a finite number, got {loss!r}"
        try:
            state = from_record(content.array_records[ADAPTER_KEY])
            check_adapter_state(self._expected.get(msg.metadata.src_node_id, self.shapes), state)
        except (AdapterStateError, ValueError, TypeError) as err:
            return f"invalid adapter: {err}"
        return state, float(weight), metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        states, weights, losses = [], [], []
        received: list[dict[str, np.ndarray] | None] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            dev = stats.devices.get(node)
            if msg.has_content():
                up = content_bytes(msg.content)
                stats.bytes_up += up
                if dev:
                    dev.bytes_up = up
            checked = self.validate_reply(msg)
            if isinstance(checked, str):
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    node,
                    checked,
                )
                stats.rejected.append({"node": node, "reason": checked})
                if dev:
                    dev.status = "rejected"
                if any(s in checked for s in _CACHE_MISS):
                    self.holdings[node] = set()
                continue
            state, weight, metrics = checked
            states.append(state)
            weights.append(weight)
            received.append(self._received.get(node))
            losses.append(float(metrics["train_loss"]))
            plan = self._plans.get(node)
            if plan is not None and plan.emulator.digest:
                self.holdings[node] = {plan.emulator.digest}
            if dev:
                dev.status, dev.train_loss, dev.examples = (
                    "ok",
                    float(metrics["train_loss"]),
                    int(weight),
                )
                dev.train_s = _num(metrics.get("train_s"))
                dev.peak_mem_mb = _num(metrics.get("peak_mem_mb"))
        stats.num_clients = len(states)
        if states:
            stats.train_loss = weighted_mean(losses, weights)
        if self.cfg.strategy.server_train and (states or not stats.devices):
            # The server's own update joins the average like one more device.
            server_state, result, n = self.server.train(self.state, server_round)
            states.append(server_state)
            weights.append(float(n))
            received.append(None)  # the server trains from the global adapter itself
            stats.server_train_loss = result.train_loss
        if not states:
            log(WARNING, "round %d: no valid update; keeping the previous adapter", server_round)
            return None, None
        rank = self.server.adapter_cfg.r
        if self.cfg.strategy.aggregation == "exact":
            # Unused directions keep the initial random A (never axis-aligned rows).
            # Averaging updates, not products, keeps what truncated devices never saw.
            merged, errors = exact_aggregate(
                states,
                weights,
                rank=rank,
                fill=self.server.initial_state,
                received=received,
                base=self.state,
            )
            stats.truncation_error = max(errors.values(), default=0.0)
        elif self.cfg.planner.enabled:  # ranks and module sets differ: pad, average per tensor
            merged = partial_average(states, weights, rank)
        else:
            merged = weighted_average(states, weights)
        # A module no one trained this round keeps its value.
        merged = {k: merged.get(k, v) for k, v in self.state.items()}
        return to_record(merged), MetricRecord({"train_loss": stats.train_loss or 0.0})

    def after_round(self, server_round: int, plugin_ppl: float) -> None:
        """The measured plug-in perplexity closes the round for the controller: reward, and
        an online update when it is due (round 0 only sets the reference perplexity)."""
        stats = self.stats.setdefault(server_round, RoundStats())
        failed = sum(1 for d in stats.devices.values() if d.status != "ok")
        t = self.control.feedback(plugin_ppl, failed, self._holding())
        if t is not None:
            stats.reward = t.reward
            stats.violations += failed
            if t.learn:
                log(INFO, "round %d: controller updated online (%s)", server_round, t.learn)

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Devices that trained this round evaluate the new global adapter on their emulator."""
        if self.cfg.strategy.fraction_evaluate <= 0:
            return []
        stats = self.stats.setdefault(server_round, RoundStats())
        trained = [n for n, d in stats.devices.items() if d.status == "ok"]
        if not trained:
            return []
        chosen = self._sample(trained, self.cfg.strategy.fraction_evaluate)
        messages = []
        for node in chosen:
            plan = self._plans[node]
            record = arrays
            if self.cfg.planner.enabled:
                record = to_record(
                    device_share(
                        from_record(arrays),
                        plan.adapter.modules,
                        plan.adapter.r,
                        self.cfg.strategy.aggregation == "exact",
                        self.server.initial_state,
                    )
                )
            content = RecordDict(
                {
                    ADAPTER_KEY: record,
                    PLAN_KEY: ConfigRecord({"plan": plan.to_json(), "server-round": server_round}),
                }
            )
            stats.bytes_down += content_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        stats = self.stats.setdefault(server_round, RoundStats())
        losses, tokens = [], []
        for msg in replies:
            if msg.has_content():
                stats.bytes_up += content_bytes(msg.content)
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            loss, count = _num(m.get("eval_loss")), _num(m.get("eval_tokens"))
            if loss is not None and count is not None and count > 0:
                losses.append(loss)
                tokens.append(count)
        if not losses:
            return None
        # Pool the token NLL across devices, then exponentiate: a token-weighted perplexity.
        ppl = float(np.exp(weighted_mean(losses, tokens)))
        stats.emulator_ppl = ppl
        return MetricRecord({"emulator_ppl": ppl})

    def summary(self) -> None:
        s, e = self.cfg.strategy, self.cfg.emulator
        log(
            INFO,
            "FedPEAT: case %d, levels %s, aggregation=%s, fraction_train=%.2f, server_train=%s, "
            "planner=%s",
            e.case,
            e.levels if e.case == 1 else e.shared_level,
            s.aggregation,
            s.fraction_train,
            s.server_train,
            "on" if self.cfg.planner.enabled else "off",
        )


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None
