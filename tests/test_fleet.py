"""Device profiles: what the server makes of what a node reports about itself."""

from __future__ import annotations

from fedpeat.config import DeviceProfile
from strategies.fleet import profile_of

SIM = DeviceProfile(
    name="phone",
    memory_mb=900,
    gflops=40,
    bandwidth_mhz=2,
    power_dbm=23,
    distance_m=80,
    disk_mb=300,
)


def test_simulated_node_takes_budget_and_link_from_the_devices_profile() -> None:
    # Detection sees the shared host, not a simulated device: the devices= profile decides.
    prof, assumed = profile_of({"detected-memory-mb": 20000.0, "bf16": False}, SIM)
    assert prof.memory_mb == 900 and prof.gflops == 40 and prof.distance_m == 80
    assert prof.disk_mb == 300
    assert assumed == [
        "memory_mb",
        "gflops",
        "bandwidth_mhz",
        "power_dbm",
        "distance_m",
        "disk_mb",
    ]
    # A node config budget and figures win over the devices= profile (disk 0: one emulator).
    prof, assumed = profile_of({"memory-mb": 500.0, "distance-m": 30.0, "disk-mb": 0.0}, SIM)
    assert (prof.memory_mb, prof.distance_m, prof.gflops, prof.disk_mb) == (500, 30, 40, 0)
    assert not {"memory_mb", "distance_m", "disk_mb"} & set(assumed)


def test_deployed_node_budget_is_its_detection_capped_by_its_config() -> None:
    prof, assumed = profile_of({"detected-memory-mb": 3000.0}, SIM, from_nodes=True)
    assert prof.memory_mb == 3000 and "memory_mb" not in assumed
    prof, _ = profile_of({"detected-memory-mb": 3000.0, "memory-mb": 700.0}, SIM, from_nodes=True)
    assert prof.memory_mb == 700
    # A cap above what the device has left is cut to what it has.
    prof, _ = profile_of({"detected-memory-mb": 600.0, "memory-mb": 700.0}, SIM, from_nodes=True)
    assert prof.memory_mb == 600
    # Nothing detected and no cap: the only fallback left is the configured profile, flagged.
    prof, assumed = profile_of({"detected-memory-mb": -1.0}, SIM, from_nodes=True)
    assert prof.memory_mb == 900 and "memory_mb" in assumed
    prof, assumed = profile_of(
        {
            "detected-memory-mb": 1.0,
            "gflops": 5.0,
            "bandwidth-mhz": 0.5,
            "power-dbm": 10.0,
            "distance-m": 300.0,
            "disk-mb": 200.0,
            "profile": "sensor",
        },
        SIM,
        from_nodes=True,
    )
    assert assumed == [] and prof.name == "sensor" and prof.bandwidth_mhz == 0.5
    assert prof.disk_mb == 200


class _StubPlan:
    def to_json(self) -> str:
        return "{}"


class _ProfileGrid:
    """Answers profile queries with each node's report (a dict per node id)."""

    def __init__(self, reports: dict[int, dict]) -> None:
        self.reports = reports
        self.asked: list[int] = []

    def send_and_receive(self, msgs, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import ConfigRecord, Message, RecordDict

        out = []
        for m in msgs:
            self.asked.append(m.metadata.dst_node_id)
            report = ConfigRecord(self.reports[m.metadata.dst_node_id])
            out.append(Message(RecordDict({"profile": report}), reply_to=m))
        return out


def test_a_device_back_under_a_new_node_id_takes_its_old_place(server_identity) -> None:
    from fedpeat.config import compose
    from strategies.fleet import Fleet
    from strategies.round_stats import RoundStats

    def report(device: str, pid: int, holds: str = "") -> dict:
        return {"device": device, "partition-id": pid, "num-partitions": 2, "holds": holds}

    fleet = Fleet(compose("experiment=tiny"))
    plan = _StubPlan()
    first = RoundStats()
    grid = _ProfileGrid({11: report("device-0", 0), 12: report("device-1", 1, "abc")})
    fleet.ask_profiles(grid, [11, 12], plan, first)  # type: ignore[arg-type]
    assert first.rejoined == {} and sorted(fleet.profiles) == [11, 12]
    # Node 12's SuperNode restarts as node 13; the SuperLink may still list 12 for a while.
    back = RoundStats()
    grid.reports[13] = report("device-1", 1, "abc")
    fleet.ask_profiles(grid, [11, 12, 13], plan, back)  # type: ignore[arg-type]
    assert back.rejoined == {13: 12} and back.as_row()["rejoined"] == {"13": 12}
    assert sorted(fleet.profiles) == [11, 13] and fleet.holdings[13] == {"abc"}
    assert fleet.renumbering() == {12: 13} and fleet.renumbering() == {}
    # The old id is never asked again, and a third device is no rejoin.
    grid.asked.clear()
    grid.reports[14] = report("device-2", 0)
    later = RoundStats()
    fleet.ask_profiles(grid, [11, 12, 13, 14], plan, later)  # type: ignore[arg-type]
    assert grid.asked == [14] and later.rejoined == {}
