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
from collections.abc import Callable, Iterable
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
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpeat.config import Config, DeviceProfile
from fedpeat.data import partition_sizes
from fedpeat.lora import AdapterStateError, check_adapter_state, state_shapes
from fedpeat.protocol import (
    ADAPTER_KEY,
    EMULATOR_KEY,
    METRICS_KEY,
    PLAN_KEY,
    PROFILE_KEY,
    RESIDUAL_KEY,
)
from fedpeat.task import EmulatorRef, Plan, ServerModel
from strategies.aggregation import (
    device_residual,
    device_share,
    exact_aggregate,
    norm_outliers,
    partial_average,
    update_norm,
    weighted_average,
    weighted_mean,
)
from strategies.assign import Assignment, assign_levels
from strategies.edge_env import Level
from strategies.online import OnlineControl
from strategies.planning import DevicePlan, plan_devices, profile_of, smallest_need_mb
from strategies.privacy import PrivateMean

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
    handler_s: float | None = None
    """Seconds in the ClientApp's train handler (loading the emulator, training, packing)."""
    peak_mem_mb: float | None = None
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
    privacy: dict[str, Any] | None = None
    """privacy.enabled: clipping, noise std, devices averaged, epsilon spent so far at delta."""
    timing: dict[str, float] = field(default_factory=dict)
    """Server-side seconds per phase: configure (planning, packaging), profile (the query
    exchange), train_exchange and evaluate_exchange (sent until every reply is in: the devices'
    work plus Flower's transport), server_train, aggregate; client_eval_sum: the devices'
    evaluate handlers."""

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
            "privacy": self.privacy,
            "timing": self.timing,
        }


class FedPEAT(Strategy):
    """Emulator-assisted federated LoRA with per-reply validation and server collaboration."""

    def __init__(self, cfg: Config, server: ServerModel, checkpoint: Path | None = None) -> None:
        self.cfg = cfg
        self.server = server
        self._sent_at = time.perf_counter()  # when the last messages left (phase timing)
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
        self._round = 0
        self.resumed = False
        self._digests: dict[float, str] = {}
        self.private = PrivateMean(cfg.privacy) if cfg.privacy.enabled else None

    # ------------------------------------------------------------------ rounds, resume

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
    ) -> Result:
        """Flower's round loop (`Strategy.start`), able to begin at `first_round` when a run
        resumes from a checkpoint (then `initial_arrays` is the checkpoint's adapter and the
        round-0 evaluation is not repeated)."""
        if first_round == 1 and not self.resumed:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        result, arrays = Result(), initial_arrays
        log(INFO, "resuming at round %d of %d", first_round, num_rounds)
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            replies = grid.send_and_receive(
                self.configure_train(rnd, arrays, train_config or ConfigRecord(), grid),
                timeout=timeout,
            )
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = grid.send_and_receive(
                self.configure_evaluate(rnd, arrays, evaluate_config or ConfigRecord(), grid),
                timeout=timeout,
            )
            if (eval_metrics := self.aggregate_evaluate(rnd, replies)) is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            if evaluate_fn and (res := evaluate_fn(rnd, arrays)) is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        return result

    def resume_state(self) -> dict[str, Any]:
        """What the next round depends on beyond the adapter: the sampling RNG, the controller
        (policy, optimiser, buffers, progress), the privacy spent, and each node's partition
        (node ids change when a run restarts; partitions do not). Devices report their own
        emulator holdings again, from their disk caches."""
        return {
            "rng": self.rng.getstate(),
            "control": self.control,
            "privacy_releases": self.private.releases if self.private else 0,
            "partitions": {n: int(p["partition-id"]) for n, p in self.profiles.items()},
            "digests": {**self._digests, **self.server.package_digests()},
            # As the round ended: a device may get the next round's emulator before a crash, and
            # the continuation must decide as the uninterrupted run did.
            "holdings": {
                int(self.profiles[n]["partition-id"]): sorted(h)
                for n, h in self.holdings.items()
                if n in self.profiles
            },
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.rng.setstate(saved["rng"])
        self.control = saved["control"]
        self.control.cfg = self.cfg  # `rounds` may have grown; the rest is checked equal
        self.resumed = True
        if self.private is not None:
            self.private.releases = int(saved["privacy_releases"])
        self._old_partitions: dict[int, int] = dict(saved["partitions"])
        self._old_holdings: dict[int, list[str]] = dict(saved["holdings"])
        self._digests = dict(saved["digests"])

    def _renumber(self) -> None:
        """After a resume, once the new nodes have told their partitions, map the old node ids
        the controller knows to the new ones."""
        old = getattr(self, "_old_partitions", None)
        if not old:
            return
        new_of = {int(p["partition-id"]): n for n, p in self.profiles.items()}
        self.control.renumber({n: new_of[pid] for n, pid in old.items() if pid in new_of})
        for pid, held in self._old_holdings.items():
            if pid in new_of:
                self.holdings[new_of[pid]] = set(held)
        self._old_partitions = {}

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
        # Drawn in partition order: node ids change when a run restarts, partitions do not.
        ordered = sorted(nodes, key=self._partition_key)
        k = max(1, round(len(nodes) * fraction))
        return sorted(self.rng.sample(ordered, min(k, len(nodes))))

    def _partition_key(self, node: int) -> tuple[int, int]:
        prof = self.profiles.get(node)
        return (int(prof["partition-id"]), node) if prof else (1 << 62, node)

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
        # Packages are built when first sent: a resumed run knows earlier ones by their digest.
        digests = {**self._digests, **self.server.package_digests()}
        return self.control.holding(self.holdings, digests)

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
        began = time.perf_counter()
        messages = list(self._configure_train(server_round, arrays, grid))
        self._sent_at = time.perf_counter()
        timing = self.stats[server_round].timing
        timing["configure"] = self._sent_at - began - timing.get("profile", 0.0)
        return messages

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._connected(grid)
        stats = self.stats.setdefault(server_round, RoundStats())
        began = time.perf_counter()
        self._profiles(grid, nodes, stats)
        stats.timing["profile"] = time.perf_counter() - began
        self._renumber()
        sampled = [
            n for n in self._sample(nodes, self.cfg.strategy.fraction_train) if n in self.profiles
        ]
        stats.num_sampled = len(sampled)
        self.state = from_record(arrays)
        self._plans, self._expected, self._received = {}, {}, {}
        messages = []
        # Server-side DP clips relative to this round's adapter; client side tells the devices.
        dp_config = self.private.configure(server_round, arrays, grid) if self.private else {}
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
            content = RecordDict({ADAPTER_KEY: arrays})
            if device_plan is not None:
                share = self._share(content, self.state, device_plan.modules, device_plan.rank)
                self._received[node] = share
            self._expected[node] = state_shapes(from_record(content.array_records[ADAPTER_KEY]))
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
            self._budget(plan, node, assignment.level, device_plan)
            plan.clipping_norm = float(dp_config.get(KEY_CLIPPING_NORM, 0.0))
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

    def _budget(self, plan: Plan, node: int, level: float, device_plan: DevicePlan | None) -> None:
        """What the device checks before training: the estimated need of its plan and, for a
        simulated device (its profile is all it has), the profile's budget. Case 3 and fed_ft
        are the full-model baselines, which assume the device holds the model."""
        if self.server.full_ft or (self.cfg.emulator.case == 3 and device_plan is None):
            return
        plan.need_mb = device_plan.memory_mb if device_plan else self.server.memory_need_mb(level)
        if not self.cfg.devices.from_nodes:
            plan.budget_mb = self.device_profiles[node].memory_mb

    def _share(
        self, content: RecordDict, state: dict[str, np.ndarray], modules: list[str], rank: int
    ) -> dict[str, np.ndarray]:
        """Put a planned device's share of the global adapter (and, exact with
        `strategy.residual`, the frozen rest of it) into `content`; return the share."""
        exact = self.cfg.strategy.aggregation == "exact"
        share = device_share(state, modules, rank, exact, self.server.initial_state)
        content[ADAPTER_KEY] = to_record(share)
        if exact and self.cfg.strategy.residual:
            rest = device_residual(state, modules, rank)
            if rest:
                content[RESIDUAL_KEY] = to_record(rest)
        return share

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
            wrong = [(k, v.dtype) for k, v in state.items() if v.dtype.kind != "f"]
            if wrong:
                return f"invalid adapter: {wrong[0][0]} has dtype {wrong[0][1]}, expected floats"
            check_adapter_state(self._expected.get(msg.metadata.src_node_id, self.shapes), state)
        except (AdapterStateError, ValueError, TypeError, EOFError, OSError) as err:
            return f"invalid adapter: {type(err).__name__}: {err}"
        return state, float(weight), metrics

    def _reject(self, stats: RoundStats, node: int, reason: str, status: str = "rejected") -> None:
        log(WARNING, "round %d: %s reply from node %d: %s", self._round, status, node, reason)
        stats.rejected.append({"node": node, "reason": reason})
        if dev := stats.devices.get(node):
            dev.status = status
        if any(s in reason for s in _CACHE_MISS):
            self.holdings[node] = set()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        began = time.perf_counter()
        timing = self.stats.setdefault(server_round, RoundStats()).timing
        timing["train_exchange"] = began - self._sent_at
        result = self._aggregate_train(server_round, replies)
        timing["aggregate"] = time.perf_counter() - began - timing.get("server_train", 0.0)
        return result

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        self._round = server_round
        valid: list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]] = []
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_content():
                up = content_bytes(msg.content)
                stats.bytes_up += up
                if dev := stats.devices.get(node):
                    dev.bytes_up = up
            checked = self.validate_reply(msg)
            if isinstance(checked, str):
                self._reject(stats, node, checked)
            else:
                valid.append((msg, *checked))
        for node in stats.devices.keys() - answered:  # the grid gave up on them at the deadline
            self._reject(
                stats,
                node,
                f"no reply within strategy.round_timeout_s={self.cfg.strategy.round_timeout_s:g}",
                "timeout",
            )
        server_update = None
        if self.cfg.strategy.server_train and (valid or not stats.devices):
            # The server's own update joins the average like one more (trusted) device.
            began = time.perf_counter()
            server_state, result, n = self.server.train(self.state, server_round)
            stats.timing["server_train"] = time.perf_counter() - began
            server_update = (server_state, float(n))
            stats.server_train_loss = result.train_loss
        valid = self._screen_norms(stats, valid, server_update)
        # Devices that trained validly, and now hold their emulator, whether or not the round
        # then aggregates.
        for msg, _, weight, metrics in valid:
            if dev := stats.devices.get(msg.metadata.src_node_id):
                dev.status, dev.train_loss, dev.examples = (
                    "ok",
                    float(metrics["train_loss"]),
                    int(weight),
                )
                dev.train_s = _num(metrics.get("train_s"))
                dev.handler_s = _num(metrics.get("handler_s"))
                dev.peak_mem_mb = _num(metrics.get("peak_mem_mb"))
            plan = self._plans.get(msg.metadata.src_node_id)
            if plan is not None and plan.emulator.digest:
                self.holdings[msg.metadata.src_node_id] = {plan.emulator.digest}
        if stats.devices and len(valid) < self.cfg.strategy.min_replies:
            log(
                WARNING,
                "round %d: %d valid update(s), strategy.min_replies=%d: keeping the adapter",
                server_round,
                len(valid),
                self.cfg.strategy.min_replies,
            )
            return None, None
        stats.num_clients = len(valid)
        if valid:
            stats.train_loss = weighted_mean(
                [float(m["train_loss"]) for *_, m in valid], [w for _, _, w, _ in valid]
            )
        if not valid and server_update is None:
            log(WARNING, "round %d: no valid update; keeping the previous adapter", server_round)
            return None, None
        if self.private is not None:
            merged = self._private_merge(server_round, stats, valid, server_update)
        else:
            merged = self._merge(stats, valid, server_update)
        if merged is None:
            return None, None
        # A module no one trained this round keeps its value.
        merged = {k: merged.get(k, v) for k, v in self.state.items()}
        return to_record(merged), MetricRecord({"train_loss": stats.train_loss or 0.0})

    def _start_of(self, node: int) -> dict[str, np.ndarray]:
        """What a device's update is measured from: its share, or the global adapter."""
        return self._received.get(node) or self.state

    def _screen_norms(
        self,
        stats: RoundStats,
        valid: list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]],
        server_update: tuple[dict[str, np.ndarray], float] | None,
    ) -> list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]]:
        """Drop updates far above the round's median norm (and, with client-side DP clipping,
        updates the device did not clip)."""
        norms = {
            msg.metadata.src_node_id: update_norm(state, self._start_of(msg.metadata.src_node_id))
            for msg, state, _, _ in valid
        }
        for node, norm in norms.items():
            if dev := stats.devices.get(node):
                dev.update_norm = norm
        trusted = [update_norm(server_update[0], self.state)] if server_update else []
        pv = self.cfg.privacy
        # Under DP the median screen is off: whom it rejects depends on the other devices' data,
        # which the noise does not cover; clipping bounds every update instead.
        bound = 0.0 if pv.enabled else self.cfg.strategy.norm_bound
        bad = norm_outliers(norms, bound, trusted)
        if pv.enabled and pv.clipping == "client":
            limit = pv.clipping_norm * (1 + 1e-4)  # float32 rounding of a clipped update
            for node, norm in norms.items():
                if norm > limit and node not in bad:
                    bad[node] = (
                        f"update norm {norm:.4g} exceeds privacy.clipping_norm="
                        f"{pv.clipping_norm:g}: the device did not clip it"
                    )
        for node, reason in bad.items():
            self._reject(stats, node, reason)
        return [v for v in valid if v[0].metadata.src_node_id not in bad]

    def _merge(
        self,
        stats: RoundStats,
        valid: list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]],
        server_update: tuple[dict[str, np.ndarray], float] | None,
    ) -> dict[str, np.ndarray]:
        states = [state for _, state, _, _ in valid]
        weights = [w for _, _, w, _ in valid]
        received: list[dict[str, np.ndarray] | None] = [
            self._received.get(msg.metadata.src_node_id) for msg, *_ in valid
        ]
        if server_update is not None:
            states.append(server_update[0])
            weights.append(server_update[1])
            received.append(None)  # the server trains from the global adapter itself
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
            return merged
        if self.cfg.planner.enabled:  # ranks and module sets differ: pad, average per tensor
            return partial_average(states, weights, rank)
        return weighted_average(states, weights)

    def _private_merge(
        self,
        server_round: int,
        stats: RoundStats,
        valid: list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]],
        server_update: tuple[dict[str, np.ndarray], float] | None,
    ) -> dict[str, np.ndarray] | None:
        """The global adapter plus the clipped updates summed over the devices sent work and
        noised (Flower's DP wrapper, `strategies.privacy`); the server's own update then joins as
        one more share (post-processing: still private)."""
        assert self.private is not None
        if not stats.devices:  # no device took part: nothing private to release
            return server_update[0] if server_update else None
        for msg, state, _, _ in valid:  # Flower clips tensor lists: use the global order
            msg.content[ADAPTER_KEY] = to_record({k: state[k] for k in self.state})
        record, stats.privacy = self.private.aggregate(
            server_round, [m for m, *_ in valid], len(stats.devices), len(self.profiles)
        )
        device_mean = from_record(record)
        if server_update is None:
            return device_mean
        n = len(stats.devices)
        return {
            key: ((n * device_mean[key] + server_update[0][key]) / (n + 1)).astype(np.float32)
            for key in self.state
        }

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
        messages = list(self._configure_evaluate(server_round, arrays))
        self._sent_at = time.perf_counter()
        return messages

    def _configure_evaluate(self, server_round: int, arrays: ArrayRecord) -> Iterable[Message]:
        if self.cfg.strategy.fraction_evaluate <= 0:
            return []
        stats = self.stats.setdefault(server_round, RoundStats())
        trained = [n for n, d in stats.devices.items() if d.status == "ok"]
        if not trained:
            return []
        chosen = self._sample(trained, self.cfg.strategy.fraction_evaluate)
        messages = []
        state = from_record(arrays) if self.cfg.planner.enabled else {}
        for node in chosen:
            plan = self._plans[node]
            content = RecordDict(
                {
                    ADAPTER_KEY: arrays,
                    PLAN_KEY: ConfigRecord({"plan": plan.to_json(), "server-round": server_round}),
                }
            )
            if self.cfg.planner.enabled:
                self._share(content, state, plan.adapter.modules, plan.adapter.r)
            stats.bytes_down += content_bytes(content)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.timing["evaluate_exchange"] = time.perf_counter() - self._sent_at
        losses, tokens = [], []
        for msg in replies:
            if msg.has_content():
                stats.bytes_up += content_bytes(msg.content)
            if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[METRICS_KEY]
            stats.timing["client_eval_sum"] = stats.timing.get("client_eval_sum", 0.0) + (
                _num(m.get("handler_s")) or 0.0
            )
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
