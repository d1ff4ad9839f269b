"""The devices the server knows: who is connected, what each reported about itself (profile,
partition, held emulators), and who is sampled for a round.

Node ids change when a run restarts; partitions do not. So sampling draws in partition order,
and a resumed run maps the ids it checkpointed to the new ones once the nodes report again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpeat.config import Config, DeviceProfile
from fedpeat.data import partition_sizes
from fedpeat.protocol import (
    ASK_FIELD,
    CACHE_KEY,
    HOLDS_FIELD,
    NODE_LINK,
    NUM_PARTITIONS,
    PARTITION_ID,
    PLAN_FIELD,
    PLAN_KEY,
    PROFILE_KEY,
    Plan,
)
from strategies.round_stats import RoundStats, content_bytes
from strategies.screening import short_reason


def profile_of(
    prof: Mapping[str, Any], sim: DeviceProfile, from_nodes: bool = False
) -> tuple[DeviceProfile, list[str]]:
    """The profile the planner and controller use for a node, and the fields taken from the
    `devices=` profile `sim` because the node did not report them (recorded as assumed).

    Memory: a budget the node's config sets (memory-mb) wins, capped by what it detects when
    `from_nodes` (deployment). Without one, a deployed node's detected memory is its budget; a
    simulated node's detection is the shared host's, so the devices= profile gives it instead.
    Link and compute figures: the node's, else the devices= profile's.
    """
    assumed: list[str] = []
    cap = float(prof.get("memory-mb", -1.0))
    detected = float(prof.get("detected-memory-mb", -1.0))
    if cap > 0:
        memory = min(cap, detected) if from_nodes and detected > 0 else cap
    elif from_nodes and detected > 0:
        memory = detected
    else:
        memory = sim.memory_mb
        assumed.append("memory_mb")
    figures: dict[str, float] = {}
    for key, name in NODE_LINK.items():
        if key in prof:
            figures[name] = float(prof[key])
        else:
            figures[name] = float(getattr(sim, name))
            assumed.append(name)
    if "disk-mb" in prof:
        disk = float(prof["disk-mb"])
    else:
        disk = sim.disk_mb
        assumed.append("disk_mb")
    profile = DeviceProfile(
        name=str(prof.get("profile", sim.name)),
        memory_mb=memory,
        disk_mb=disk,
        bf16=bool(prof.get("bf16", sim.bf16)),
        **figures,
    )
    return profile, assumed


class Fleet:
    """Connected devices, their reports and holdings, and the round's sample.

    Parameters
    ----------
    cfg : Config
        The run's config (`strategy.min_nodes`, `devices`, `data`, `partition`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.profiles: dict[int, dict[str, Any]] = {}
        """Node -> what it reported, with the memory budget and profile name used."""
        self.device_profiles: dict[int, DeviceProfile] = {}
        self.holdings: dict[int, set[str]] = {}
        """Node -> digests of the emulators it holds."""
        self._data_sizes: dict[int, list[int]] = {}
        self._old_partitions: dict[int, int] = {}
        self._old_holdings: dict[int, list[str]] = {}
        self._rejoined: dict[int, int] = {}
        self.gone: set[int] = set()
        """Node ids whose device came back under another id."""

    # ------------------------------------------------------------------ who is there

    def connected(self, grid: Grid) -> list[int]:
        """The connected nodes, once `strategy.min_nodes` are (round 1 may start with none)."""
        need, waited = self.cfg.strategy.min_nodes, 0
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if waited % 10 == 0:
                log(INFO, "waiting for devices: %d connected, %d needed", len(nodes), need)
            time.sleep(1.0)
            waited += 1
        return nodes

    def ask_profiles(self, grid: Grid, nodes: list[int], plan: Plan, stats: RoundStats) -> None:
        """Ask devices not heard from for their profile (partition, memory, holdings). `plan`
        tells a device which data config to count its training examples under."""
        missing = [n for n in nodes if n not in self.profiles and n not in self.gone]
        if not missing:
            return
        query = ConfigRecord({ASK_FIELD: "profile", PLAN_FIELD: plan.to_json()})
        msgs = [
            Message(RecordDict({PLAN_KEY: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in missing
        ]
        stats.bytes_down += sum(content_bytes(m.content) for m in msgs)
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.strategy.round_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_content():
                stats.bytes_up += content_bytes(reply.content)
            if reply.has_error() or PROFILE_KEY not in reply.content.config_records:
                reason = (reply.error.reason if reply.has_error() else None) or "no profile"
                log(WARNING, "node %d sent no profile: %s", node, short_reason(reason))
                continue
            prof = dict(reply.content.config_records[PROFILE_KEY])
            self._rejoin(node, prof, stats)
            self._add(node, prof, stats)

    def _rejoin(self, node: int, prof: Mapping[str, Any], stats: RoundStats) -> None:
        """A device that left and came back (a restarted SuperNode gets a new node id): a new
        node reporting a known node's device name (else partition) takes its place, whether or
        not the SuperLink has noticed yet that the old one is gone; the old id is never asked
        or sampled again and the controller is renumbered (`renumbering`)."""
        for old in [n for n in self.profiles if n != node]:
            if _device_key(self.profiles[old]) == _device_key(prof):
                stats.rejoined[node] = old
                self._rejoined[old] = node
                self.gone.add(old)
                for table in (self.profiles, self.device_profiles, self.holdings):
                    table.pop(old, None)
                log(INFO, "node %d is the device of node %d, back after leaving", node, old)

    def _add(self, node: int, prof: dict[str, Any], stats: RoundStats) -> None:
        # What a node does not report about itself comes from the devices= profile.
        profiles = self.cfg.devices.profiles
        sim = profiles[int(prof[PARTITION_ID]) % len(profiles)]
        device, assumed = profile_of(prof, sim, self.cfg.devices.from_nodes)
        self.device_profiles[node] = device
        prof["memory-mb"] = device.memory_mb
        prof["profile"] = device.name
        self.profiles[node] = prof
        stats.profiles[node] = {**prof, **vars(device), "assumed": assumed}
        self.holdings[node] = {d for d in str(prof.get("holds", "")).split(",") if d}

    def note_holdings(self, reply: Message, plan: Plan | None) -> None:
        """What a device keeps after a train round: the list its reply gives; a reply without
        one is taken to hold the emulator it trained on; an error changes nothing (a device
        that lost its emulator says so, and `lost_emulator` clears its record)."""
        if reply.has_error() or not reply.has_content():
            return
        node = reply.metadata.src_node_id
        record = reply.content.config_records.get(CACHE_KEY)
        if record is not None and HOLDS_FIELD in record:
            self.holdings[node] = {d for d in str(record[HOLDS_FIELD]).split(",") if d}
        elif plan is not None and plan.emulator.digest:
            self.holdings[node] = {plan.emulator.digest}

    def known(self, nodes: list[int]) -> list[int]:
        """The nodes that reported a profile, in partition order."""
        return sorted((n for n in nodes if n in self.profiles), key=self.partition)

    def partition(self, node: int) -> int:
        return int(self.profiles[node][PARTITION_ID])

    def sample(self, nodes: list[int], fraction: float) -> list[int]:
        """A `fraction` of `nodes` (at least one), drawn in partition order."""
        ordered = sorted(nodes, key=self._partition_key)
        k = max(1, round(len(nodes) * fraction))
        return sorted(self.rng.sample(ordered, min(k, len(nodes))))

    def _partition_key(self, node: int) -> tuple[int, int]:
        prof = self.profiles.get(node)
        return (int(prof[PARTITION_ID]), node) if prof else (1 << 62, node)

    def data_size(self, node: int) -> int:
        """The device's training examples (the planner's data term): what it reported, else its
        partition's size under the shared data seed."""
        if int(self.profiles[node].get("data-size", 0)) > 0:
            return int(self.profiles[node]["data-size"])
        n = int(self.profiles[node][NUM_PARTITIONS])
        if n not in self._data_sizes:
            self._data_sizes[n] = partition_sizes(self.cfg.data, self.cfg.partition, n)
        return self._data_sizes[n][self.partition(node)]

    def known_examples(self, nodes: Iterable[int]) -> dict[int, float]:
        """Node -> the training examples the server knows it to have (`data_size`), for the
        profiled ones among `nodes`: no reply may weigh its update beyond that."""
        return {n: float(self.data_size(n)) for n in nodes if n in self.profiles}

    # ------------------------------------------------------------------ resume

    def resume_state(self) -> dict[str, Any]:
        """The sampling RNG, each node's partition and, as the round ended, what each partition
        holds (a device may get the next round's emulator before a crash, and the continuation
        must decide as the uninterrupted run did)."""
        return {
            "rng": self.rng.getstate(),
            "partitions": {n: self.partition(n) for n in self.profiles},
            "holdings": {
                self.partition(n): sorted(h) for n, h in self.holdings.items() if n in self.profiles
            },
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.rng.setstate(saved["rng"])
        self._old_partitions = dict(saved["partitions"])
        self._old_holdings = dict(saved["holdings"])

    def renumbering(self) -> dict[int, int]:
        """Old node id -> new one, for the controller: once after a resume, when the new nodes
        have told their partitions (their holdings are restored under the new ids), and for
        devices that came back under a new id (`_rejoin`)."""
        back, self._rejoined = self._rejoined, {}
        if not self._old_partitions:
            return back
        new_of = {self.partition(n): n for n in self.profiles}
        mapping = {n: new_of[pid] for n, pid in self._old_partitions.items() if pid in new_of}
        for pid, held in self._old_holdings.items():
            if pid in new_of:
                self.holdings[new_of[pid]] = set(held)
        self._old_partitions = {}
        return {**back, **mapping}


def _device_key(prof: Mapping[str, Any]) -> tuple[Any, ...]:
    """What names a device across node ids: the name it reports, else its partition."""
    if prof.get("device"):
        return ("device", prof["device"])
    return (prof.get(PARTITION_ID), prof.get(NUM_PARTITIONS))
