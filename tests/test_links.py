"""Measured links: each node's exchanges timed at the server, its throughput derived by hand,
and the cost model pricing the node by it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from strategies.links import MIN_EXCHANGE_S, LinkMeter, TimedGrid


def test_link_meter_by_hand() -> None:
    meter = LinkMeter(window=2)
    assert meter.bps(1) == 0.0
    # 1 MB both ways in a 3 s round trip, 1 s of it in the handler: 8e6 bits / 2 s.
    assert meter.add(1, 1e6, 3.0, 1.0)
    assert meter.bps(1) == pytest.approx(4e6)
    # A second exchange, 3 MB in 4 s: (1 + 3) MB * 8 / (2 + 4) s.
    assert meter.add(1, 3e6, 5.0, 1.0)
    assert meter.bps(1) == pytest.approx(32e6 / 6)
    # The window keeps the last two: (3 + 1) MB over (4 + 1) s.
    assert meter.add(1, 1e6, 1.5, 0.5)
    assert meter.bps(1) == pytest.approx(32e6 / 5)
    # Too short to say anything about the link, nothing moved, or a broken figure: ignored.
    assert not meter.add(2, 1e6, 1.0, 1.0 - MIN_EXCHANGE_S / 2)
    assert not meter.add(2, 0, 5.0, 1.0)
    assert not meter.add(2, 1e6, float("inf"), 1.0)
    assert meter.bps(2) == 0.0
    meter.renumber({1: 7})
    assert meter.bps(7) == pytest.approx(32e6 / 5) and meter.bps(1) == 0.0


class _FakeGrid:
    """Replies to messages 'a' (node 1) and 'b' (node 2) arrive 1.0 s and 2.5 s after the push;
    a third, 'c' (node 3), never does."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.arrive = {"a": (1.0, 1), "b": (2.5, 2), "c": (1e9, 3)}
        self.nodes = [1, 2, 3]

    def push_messages(self, messages):
        list(messages)
        return ["a", "b", "c"]

    def pull_messages(self, ids):
        out = []
        for msg_id in list(ids):
            at, node = self.arrive[msg_id]
            if at <= self.clock[0]:
                out.append(
                    SimpleNamespace(
                        metadata=SimpleNamespace(reply_to_message_id=msg_id, src_node_id=node)
                    )
                )
                self.arrive[msg_id] = (float("inf"), node)  # pulled once
        return out

    def get_node_ids(self):
        return self.nodes


def test_timed_grid_notes_when_each_reply_arrived() -> None:
    clock = [0.0]

    def sleep(s: float) -> None:
        clock[0] += s

    grid = TimedGrid(_FakeGrid(clock), poll_s=0.5, clock=lambda: clock[0], sleep=sleep)
    replies = grid.send_and_receive([], timeout=4.0)
    # Polled every 0.5 s: 'a' seen at 1.0, 'b' at 2.5; 'c' given up at the 4 s deadline.
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert grid.round_trip_s == {1: 1.0, 2: 2.5}
    assert clock[0] == pytest.approx(4.0)
    assert grid.get_node_ids() == [1, 2, 3]  # everything else is the wrapped grid's


def test_the_cost_model_prices_a_measured_link() -> None:
    from fedpeat.config import DeviceProfile
    from fedpeat.cost import Level, device_latency_s

    level = Level(0.5, 0.5, 1e6, 1_000_000, 100.0)
    prof = DeviceProfile(memory_mb=1000, gflops=1.0, link_bps=8e6)
    # 1e6 emulator + 1e5 adapter bytes down, 1e5 up, at 8e6 bit/s: 1.2 s; fading plays no
    # part; 1000 tokens * 4 * 1e6 / 1e9 = 4 s of compute.
    for fading in (0.1, 1.0, 3.0):
        assert device_latency_s(prof, fading, level, True, 1e5, 1e3) == pytest.approx(5.2)


@pytest.mark.parametrize("measure", ["on", "off"])
def test_a_federated_run_measures_each_nodes_link(
    tmp_path, server_identity, device_disks, measure
) -> None:
    from bench.inprocess import InProcessGrid
    from fedpeat.config import compose
    from fedpeat.outputs import read_metrics
    from server_app.app import _run

    cfg = compose(f"experiment=tiny rounds=2 devices.measure_links={measure}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    delays = {1000: 1.0, 1001: 2.0}  # simulated link seconds of the two devices
    _run(InProcessGrid(2, delay_s=delays.__getitem__), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    row = rows[1]
    assert row["num_clients"] == 2
    # Round 1 is priced by the link figures; round 2 by what round 1 measured, where measured.
    assert {d["priced_by"] for d in row["devices"]} == {"link figures"}
    later = "measured" if measure == "on" else "link figures"
    assert {d["priced_by"] for d in rows[2]["devices"]} == {later}
    for dev in row["devices"]:
        if measure == "off":
            assert dev["link_bps"] is None and dev["round_trip_s"] is None
            continue
        moved = 8.0 * (dev["bytes_down"] + dev["bytes_up"])
        # The transfer part is the simulated delay, seen to the poll's resolution (0.5 s).
        delay = delays[dev["node"]]
        assert moved / (delay + 0.6) <= dev["link_bps"] <= moved / delay
        assert dev["round_trip_s"] >= delay


def test_the_controller_prices_nodes_by_their_measured_links() -> None:
    from fedpeat.config import compose
    from strategies.control.online import OnlineControl

    cfg = compose("experiment=tiny controller=greedy")
    control = OnlineControl(cfg, None, 1e5, False)
    control.start([5, 6], {5: cfg.devices.profiles[0], 6: cfg.devices.profiles[1]}, {5: 1, 6: 1})
    control.measured({5: 8e6, 6: 0.0})  # node 6 not measured yet: its link figures stay
    assert [p.link_bps for p in control.profiles] == [8e6, 0.0]
    control.measured({5: 0.0, 6: 4e6})  # a node keeps its last figure until a new one
    assert [p.link_bps for p in control.profiles] == [8e6, 4e6]
