"""FedPEAT strategy (Message API): the Strategy hooks and the round loop.

Each round: sample devices (`fleet`); give each the emulator level its memory allows (case 1),
the shared one (case 2), the full model (case 3) or the controller's choice, and its plan
(`planning`); send the emulator's weights only to devices that do not hold that digest; validate
every reply (`screening`); let the server train on its own data too; aggregate the adapters
(`aggregation`). A round without any valid update keeps the previous adapter. The round ends in
`end_round`, which the ServerApp's recorder calls once the plug-in model is evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpeat.config import Config
from fedpeat.cost import server_seconds
from fedpeat.lora import state_shapes
from fedpeat.protocol import (
    ADAPTER_KEY,
    EMULATOR_KEY,
    PLAN_FIELD,
    PLAN_KEY,
    ROUND_FIELD,
    EmulatorRef,
    Plan,
)
from fedpeat.server_model import ServerModel
from strategies.aggregation import (
    merge_updates,
    update_norm,
    weighted_mean,
)
from strategies.control.online import OnlineControl
from strategies.fleet import Fleet
from strategies.links import MeasuredLinks
from strategies.planning import (
    Assignment,
    DevicePlan,
    build_plan,
    device_work,
    plan_round,
    put_adapter,
    stack_blocks,
)
from strategies.planning import server_levels as priced_levels
from strategies.privacy import PrivateMean, private_merge
from strategies.round_stats import (
    DeviceRound,
    RoundStats,
    content_bytes,
    from_record,
    to_record,
)
from strategies.screening import Accepted, accept_replies, lost_emulator, screen_norms


class FedPEAT(Strategy):
    """Emulator-assisted federated LoRA with per-reply validation and server collaboration.

    Parameters
    ----------
    cfg : Config
        The run's validated config.
    server : ServerModel
        The full model, the server's data and the emulator factory.
    checkpoint : Path | None
        The pre-trained policy for `controller=ppo` (None: none, or train from scratch).
    """

    def __init__(self, cfg: Config, server: ServerModel, checkpoint: Path | None = None) -> None:
        self.cfg, self.server, self.fleet = cfg, server, Fleet(cfg)
        self.control = OnlineControl(
            cfg,
            checkpoint,
            float(sum(v.nbytes for v in server.initial_state.values())),
            cfg.strategy.name == "fed_ft",
        )
        self.control.server_s = server_seconds(cfg, server.full_shape.params)
        self.private = PrivateMean(cfg.privacy) if cfg.privacy.enabled else None
        self.shapes = state_shapes(server.initial_state)
        self.stats: dict[int, RoundStats] = {}
        self.state: dict[str, np.ndarray] = dict(server.initial_state)
        # This round's work per node: its plan, the shapes it must return, and what it started
        # from (its share of the global adapter, for the update average).
        self._plans: dict[int, Plan] = {}
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self._offsets: dict[int, int] = {}  # aggregation=stack: each device's block this round
        self._digests: dict[float, str] = {}  # a resumed run's packages, by level
        self._sent_at = time.perf_counter()  # when the last messages left (phase timing)
        self._records: dict[float, ArrayRecord] = {}  # this round's emulator records, by level
        self._round = 0
        self.resumed = False
        self.links = MeasuredLinks(cfg.devices.measuring)

    # ------------------------------------------------------------------ the round loop

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
        grid = self.links.wrap(grid)
        if first_round == 1 and not self.resumed:
            configs = (train_config, evaluate_config, evaluate_fn)
            return super().start(grid, initial_arrays, num_rounds, timeout, *configs)
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

    def end_round(self, server_round: int, plugin_ppl: float) -> RoundStats:
        """Close the round with the measured plug-in perplexity: the controller's reward and an
        online update when one is due (round 0 only sets the reference); returns the round's
        stats for the metrics row."""
        stats = self.stats.setdefault(server_round, RoundStats())
        failed = sum(1 for d in stats.devices.values() if d.status != "ok")
        t = self.control.feedback(plugin_ppl, failed, self._holding())
        if t is not None:
            stats.reward = t.reward
            stats.violations += failed
            if t.learn:
                log(INFO, "round %d: controller updated online (%s)", server_round, t.learn)
        return stats

    def resume_state(self) -> dict[str, Any]:
        """What the next round depends on beyond the adapter: the sampling RNG, node partitions
        and holdings (`Fleet.resume_state`), the controller (policy, optimiser, buffers,
        progress), the privacy spent and the emulator packages' digests."""
        return {
            **self.fleet.resume_state(),
            "control": self.control,
            "privacy_releases": self.private.releases if self.private else 0,
            "digests": {**self._digests, **self.server.package_digests()},
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.fleet.restore(saved)
        self.control = saved["control"]
        self.control.cfg = self.cfg  # `rounds` may have grown; the rest is checked equal
        self.resumed = True
        if self.private is not None:
            self.private.releases = int(saved["privacy_releases"])
        self._digests = dict(saved["digests"])

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask new devices for profiles, choose levels and plans, build one message a device."""
        began = time.perf_counter()
        stats = self.stats.setdefault(server_round, RoundStats())
        nodes = self.fleet.connected(grid)
        asked = time.perf_counter()
        self.fleet.ask_profiles(grid, nodes, build_plan(self.cfg, self.server, 0), stats)
        stats.timing["profile"] = time.perf_counter() - asked
        self.control.renumber(self.fleet.renumbering())
        fleet = self.fleet
        sampled = fleet.sample(nodes, self.cfg.strategy.fraction_train)
        sampled = [n for n in sampled if n in fleet.profiles]
        stats.num_sampled = len(sampled)
        self.state = from_record(arrays)
        self._plans, self._expected, self._received, self._offsets = {}, {}, {}, {}
        # Server-side DP clips relative to this round's adapter; client side tells the devices.
        dp_config = self.private.configure(server_round, arrays, grid) if self.private else {}
        known = fleet.known(nodes)
        if not self.control.levels:
            self.control.levels = priced_levels(self.cfg, self.server)
        self.control.start(known, fleet.device_profiles, {n: fleet.data_size(n) for n in known})
        options = self.control.act(self._holding())
        stats.decided = self.control.decided
        assignments, plans, violations = plan_round(
            self.cfg,
            self.server,
            fleet.device_profiles,
            sampled,
            options,
            fleet.data_size,
            self._emulator_bytes,
        )
        if self.cfg.strategy.aggregation == "stack":  # FLoRA: where each device's block goes
            placed = stack_blocks(self.state, plans, self.server)
            self.state, self._offsets, stats.truncation_error = placed
        clipping = float(dp_config.get(KEY_CLIPPING_NORM, 0.0))
        messages, self._records = [], {}
        # By level: one emulator package built, and one record shared by its messages, per level.
        for node, assignment in sorted(assignments.items(), key=lambda kv: kv[1].level or 0.0):
            plan = plans.get(node)
            if msg := self._train_message(server_round, node, assignment, plan, arrays, clipping):
                messages.append(msg)
        self._price(stats, assignments, violations)
        log(
            INFO,
            "round %d: %d device(s) train, %d skipped, %d emulator(s) sent (%.1f MB)",
            server_round,
            len(messages),
            len(stats.skipped),
            stats.exchanges,
            stats.emulator_bytes / 2**20,
        )
        self._sent_at = time.perf_counter()
        stats.timing["configure"] = self._sent_at - began - stats.timing["profile"]
        return messages

    def _train_message(
        self,
        server_round: int,
        node: int,
        assignment: Assignment,
        device_plan: DevicePlan | str | None,
        arrays: ArrayRecord,
        clipping_norm: float,
    ) -> Message | None:
        """One device's train message (None: skipped, with the reason in the round's stats)."""
        stats = self.stats[server_round]
        if assignment.level is None or isinstance(device_plan, str):
            stats.skipped.append({"node": node, "reason": assignment.reason or str(device_plan)})
            return None
        content = RecordDict({ADAPTER_KEY: arrays})
        planned = (device_plan.modules, device_plan.rank) if device_plan else None
        offset = self._offsets.get(node, 0)
        if share := put_adapter(
            content, self.cfg, self.server, self.state, assignment.level, planned, offset
        ):
            self._received[node] = share  # a part of the global adapter, not all of it
        self._expected[node] = state_shapes(from_record(content.array_records[ADAPTER_KEY]))
        ref, sent_bytes = EmulatorRef(), 0
        if self.cfg.emulator.case != 3:
            level = assignment.level
            ref = EmulatorRef.of(self.server.package_ref(level)[0])
            if ref.digest not in self.fleet.holdings.get(node, set()):  # tensors only if sent
                if level not in self._records:
                    pkg = self.server.package(level)
                    self._records[level] = to_record(pkg.state, consume=True)
                content[EMULATOR_KEY] = record = self._records[level]
                sent_bytes = record.count_bytes()
                stats.exchanges += 1
                stats.emulator_bytes += sent_bytes
        plan = build_plan(
            self.cfg,
            self.server,
            server_round,
            assignment.level,
            ref,
            device_plan,
            self.fleet.device_profiles[node],
            clipping_norm,
        )
        content[PLAN_KEY] = ConfigRecord({PLAN_FIELD: plan.to_json(), ROUND_FIELD: server_round})
        self._plans[node] = plan
        down = content_bytes(content)
        stats.bytes_down += down
        stats.devices[node] = DeviceRound.sent(
            node, self.fleet.partition(node), assignment.level, sent_bytes > 0, down, device_plan
        )
        stats.devices[node].priced_with(self.fleet.device_profiles[node].link_bps)
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

    def _emulator_bytes(self, node: int, level: float) -> int:
        ref, nbytes = self.server.package_ref(level)
        return 0 if ref.digest in self.fleet.holdings.get(node, set()) else nbytes

    def _holding(self) -> list[list[int]]:
        # Packages are built when first sent: a resumed run knows earlier ones by their digest.
        digests = {**self._digests, **self.server.package_digests()}
        return self.control.holding(self.fleet.holdings, digests)

    def _price(
        self, stats: RoundStats, assignments: dict[int, Assignment], violations: int
    ) -> None:
        """The round's modelled latency, swaps and violations (cost model), as sent."""
        levels_sent = {n: d.level for n, d in stats.devices.items()}
        stats.action = {n: levels_sent.get(n) for n in sorted(assignments)}
        # Holdings as they were before this round (replies update them); now that this round's
        # packages exist, a device that already holds its level is recognised by the digest.
        work = device_work(self._plans, self._expected, self.cfg.data.max_length)
        case3 = self.cfg.emulator.case == 3
        t = self.control.price_sent(levels_sent, self._holding(), violations, case3, work)
        priced = t.outcome
        stats.latency_s, stats.swaps = priced.latency_s, priced.swaps
        stats.violations = priced.memory_violations + priced.swap_violations

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and screen the replies, add the server's own update, aggregate."""
        began = time.perf_counter()
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.timing["train_exchange"] = began - self._sent_at
        self._round = server_round
        replies = list(replies)
        known = self.fleet.known_examples(stats.devices)  # the most weight a reply may claim
        timeout = self.cfg.strategy.round_timeout_s
        valid, refused = accept_replies(stats, replies, self._expected, self.shapes, timeout, known)
        for msg in replies:
            self.fleet.note_holdings(msg, self._plans.get(msg.metadata.src_node_id))
        if self.links.on:  # measured links: time each exchange, price the node by it
            links = self.links.record(replies, stats.devices, self.fleet.device_profiles)
            self.control.measured(links)
        for node, reason, status in refused:
            self._reject(stats, node, reason, status)
        server_update = None
        if self.cfg.strategy.server_train and (valid or not stats.devices):
            # The server's own update joins the average like one more (trusted) device.
            trained = time.perf_counter()
            server_state, result, n = self.server.train(self.state, server_round)
            stats.timing["server_train"] = time.perf_counter() - trained
            server_update = (server_state, float(n))
            stats.server_train_loss = result.train_loss
        valid = self._screen(stats, valid, server_update)
        merged = self._aggregate(server_round, stats, valid, server_update)
        record = None
        if merged is not None:  # a module no one trained this round keeps its value
            record = to_record({k: merged.get(k, v) for k, v in self.state.items()})
        stats.timing["aggregate"] = (
            time.perf_counter() - began - stats.timing.get("server_train", 0.0)
        )
        if record is None:
            return None, None
        return record, MetricRecord({"train_loss": stats.train_loss or 0.0})

    def _screen(
        self,
        stats: RoundStats,
        valid: list[Accepted],
        server_update: tuple[dict[str, np.ndarray], float] | None,
    ) -> list[Accepted]:
        """Drop updates far above the round's median norm (`screen_norms`); record the rest:
        they trained validly and now hold their emulator, whether or not the round then
        aggregates."""
        norms = {
            msg.metadata.src_node_id: update_norm(state, self._start_of(msg.metadata.src_node_id))
            for msg, state, _, _ in valid
        }
        for node, norm in norms.items():
            if dev := stats.devices.get(node):
                dev.update_norm = norm
        trusted = [update_norm(server_update[0], self.state)] if server_update else []
        bad = screen_norms(self.cfg, norms, trusted)
        for node, reason in bad.items():
            self._reject(stats, node, reason)
        valid = [v for v in valid if v[0].metadata.src_node_id not in bad]
        for msg, _, weight, metrics in valid:
            stats.trained(msg.metadata.src_node_id, weight, metrics)
        return valid

    def _start_of(self, node: int) -> dict[str, np.ndarray]:
        """What a device's update is measured from: its share, or the global adapter."""
        return self._received.get(node) or self.state

    def _reject(self, stats: RoundStats, node: int, reason: str, status: str = "rejected") -> None:
        log(WARNING, "round %d: %s reply from node %d: %s", self._round, status, node, reason)
        stats.rejected.append({"node": node, "reason": reason})
        if dev := stats.devices.get(node):
            dev.status = status
        if lost_emulator(reason):
            self.fleet.holdings[node] = set()

    def _aggregate(
        self,
        server_round: int,
        stats: RoundStats,
        valid: list[Accepted],
        server_update: tuple[dict[str, np.ndarray], float] | None,
    ) -> dict[str, np.ndarray] | None:
        """The new global adapter, or None to keep the previous one."""
        if stats.devices and len(valid) < self.cfg.strategy.min_replies:
            log(
                WARNING,
                "round %d: %d valid update(s), strategy.min_replies=%d: keeping the adapter",
                server_round,
                len(valid),
                self.cfg.strategy.min_replies,
            )
            return None
        stats.num_clients = len(valid)
        if valid:
            stats.train_loss = weighted_mean(
                [float(m["train_loss"]) for *_, m in valid], [w for _, _, w, _ in valid]
            )
        if not valid and server_update is None:
            log(WARNING, "round %d: no valid update; keeping the previous adapter", server_round)
            return None
        if self.private is not None:
            merged, stats.privacy = private_merge(
                self.private,
                server_round,
                [(msg, state) for msg, state, _, _ in valid],
                len(stats.devices),
                len(self.fleet.profiles),
                server_update[0] if server_update else None,
            )
            return merged
        states = [state for _, state, _, _ in valid]
        weights = [w for _, _, w, _ in valid]
        received = [self._received.get(msg.metadata.src_node_id) for msg, *_ in valid]
        if server_update is not None:  # the server trains from the global adapter itself
            states, weights = [*states, server_update[0]], [*weights, server_update[1]]
            received.append(None)
        merged, stats.truncation_error = merge_updates(
            self.cfg.strategy.aggregation,
            states,
            weights,
            self.server.adapter_cfg.r,
            self.cfg.planner.enabled or self.server.partial_adapters,
            fill=self.server.initial_state,
            received=received,
            base=self.state,
            offsets=[self._offsets.get(msg.metadata.src_node_id, 0) for msg, *_ in valid],
        )
        return merged

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Devices that trained this round evaluate the new global adapter on their emulator."""
        stats = self.stats.setdefault(server_round, RoundStats())
        trained = [n for n, d in stats.devices.items() if d.status == "ok"]
        messages = []
        if self.cfg.strategy.fraction_evaluate > 0 and trained:
            chosen = self.fleet.sample(trained, self.cfg.strategy.fraction_evaluate)
            state = from_record(arrays) if self.cfg.planner.enabled else {}
            for node in chosen:
                plan = self._plans[node]
                content = RecordDict(
                    {
                        ADAPTER_KEY: arrays,
                        PLAN_KEY: ConfigRecord(
                            {PLAN_FIELD: plan.to_json(), ROUND_FIELD: server_round}
                        ),
                    }
                )
                mods = (plan.adapter.modules, plan.adapter.r) if self.cfg.planner.enabled else None
                put_adapter(content, self.cfg, self.server, state, plan.emulator.keep_ratio, mods)
                stats.bytes_down += content_bytes(content)
                messages.append(
                    Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
                )
        self._sent_at = time.perf_counter()
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The devices' emulator perplexity: token NLL pooled over devices, exponentiated."""
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.timing["evaluate_exchange"] = time.perf_counter() - self._sent_at
        ppl = stats.pool_evaluations(replies)
        return None if ppl is None else MetricRecord({"emulator_ppl": ppl})

    def summary(self) -> None:
        s, e = self.cfg.strategy, self.cfg.emulator
        levels = e.levels if e.case == 1 else e.shared_level
        planner = "on" if self.cfg.planner.enabled else "off"
        text = "FedPEAT: case %d, levels %s, aggregation=%s, fraction_train=%.2f, server_train=%s"
        figures = (e.case, levels, s.aggregation, s.fraction_train, s.server_train, planner)
        log(INFO, text + ", planner=%s", *figures)
