"""A device keeps several emulators up to the disk it gives them (least recently used go first);
the cost model, the controller's view and the server's sending all follow what it keeps."""

from __future__ import annotations

import numpy as np
import pytest

from bench.inprocess import InProcessGrid
from fedpeat.config import DeviceProfile, compose
from fedpeat.cost import Level, MiB, Weights, cache_keep, price_round
from fedpeat.outputs import read_metrics
from server_app.app import _run


def test_cache_keep_by_hand() -> None:
    # Oldest use first; sizes 3, 2, 4 (newest, in use). Budget 7: the newest (4) and the one
    # used before it (2) make 6; the oldest (3) would make 9: dropped.
    assert cache_keep(["a", "b", "c"], [3, 2, 4], 7) == ["b", "c"]
    assert cache_keep(["a", "b", "c"], [3, 2, 4], 9) == ["a", "b", "c"]
    # LRU, not best fit: b (5) does not fit beside c, so a (1) is dropped too though it would.
    assert cache_keep(["a", "b", "c"], [1, 5, 4], 6) == ["c"]
    # The one in use stays even where it alone exceeds the budget; budget 0: it alone.
    assert cache_keep(["a", "b"], [1, 10], 5) == ["b"]
    assert cache_keep(["a", "b"], [1, 1], 0) == ["b"]
    assert cache_keep([], [], 5) == []


def _price(actions: list[int], disk_mb: float) -> tuple[list[int], list[int], list[list[int]]]:
    """Exchanges and swaps per round for one device following `actions` (levels A=1, B=2)."""
    w = Weights(1.0, 0.01, 0.5, 2.0, 1.0, 0.25)
    levels = [Level(0.4, 0.5, 100 * MiB, 1000, 10.0), Level(0.2, 0.3, 80 * MiB, 800, 10.0)]
    prof = DeviceProfile(memory_mb=1000, disk_mb=disk_mb)
    holding: list[list[int]] = [[]]
    swaps = [0]
    exchanges, swapped, held = [], [], []
    for r, a in enumerate(actions):
        out = price_round([a], [prof], levels, np.ones(1), holding, swaps, r, w, 0.0, 0.0)
        exchanges.append(out.exchanges)
        swapped.append(out.swaps)
        held.append(list(holding[0]))
    return exchanges, swapped, held


def test_a_to_b_to_a_sends_a_once_where_both_fit() -> None:
    exchanges, swaps, held = _price([1, 2, 1], disk_mb=200)
    assert exchanges == [1, 1, 0] and swaps == [0, 1, 0]
    assert held == [[1], [1, 2], [2, 1]]  # oldest use first
    # Room for one: each change of level is a download and a swap.
    exchanges, swaps, held = _price([1, 2, 1], disk_mb=150)
    assert exchanges == [1, 1, 1] and swaps == [0, 1, 1] and held == [[1], [2], [1]]


def test_the_policy_sees_every_emulator_a_device_holds() -> None:
    from strategies.control.edge_env import Situation

    s = Situation(
        gain_db=np.zeros(2),
        memory_mb=np.array([900.0, 900.0]),
        need_mb=np.array([500.0, 400.0]),
        fidelity=np.array([0.5, 0.3]),
        holding=[[1, 2], []],
        swap_counts=[0, 0],
        data_share=np.array([0.5, 0.5]),
        round_index=0,
        rounds=3,
        ppl_ratio=1.0,
        wire_mb=np.array([100.0, 80.0]),
        option_s=np.ones((2, 2)),
    )
    obs = s.features()
    assert obs.option[0, :, 5].tolist() == [0.0, 1.0, 1.0]
    assert obs.option[1, :, 5].tolist() == [0.0, 0.0, 0.0]
    assert obs.device[:, 3].tolist() == [1.0, 0.0]


def test_a_device_keeps_recent_emulators_within_its_disk(tmp_path, monkeypatch) -> None:
    import os

    import fedpeat.device as dev
    from fedpeat.emulator import Package, content_hash

    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))

    def package(seed: int) -> Package:
        state = {"w": np.random.default_rng(seed).standard_normal(64 * 1024).astype(np.float32)}
        return Package("{}", [0], 0.5, 0, 0, 1, state, content_hash("{}", [0], state))

    a, b, c = package(1), package(2), package(3)  # 256 KiB each (and a little metadata)
    assert dev.receive_emulator(a, "d", disk_mb=0.6) == [a.digest]
    assert dev.receive_emulator(b, "d", disk_mb=0.6) == sorted([a.digest, b.digest])
    # a is used again, so b is now the least recently used and goes when c arrives.
    path_b = tmp_path / "d" / f"{b.digest}.safetensors"
    os.utime(path_b, ns=(1, 1))
    assert dev.keep_recent("d", a.digest, 0.6) == sorted([a.digest, b.digest])
    assert dev.receive_emulator(c, "d", disk_mb=0.6) == sorted([a.digest, c.digest])
    assert dev.held_emulators("d") == sorted([a.digest, c.digest])
    # A device with no disk to spare keeps only the one in use.
    assert dev.receive_emulator(b, "d", disk_mb=0) == [b.digest]
    # The node config's disk-mb wins over the server's figure; it must not be negative.
    plan = dev.Plan(disk_mb=5.0)
    assert dev.disk_budget_mb(plan, {}) == 5.0
    assert dev.disk_budget_mb(plan, {"disk-mb": "0"}) == 0.0
    with pytest.raises(ValueError, match="disk-mb"):
        dev.disk_budget_mb(plan, {"disk-mb": "-1"})


@pytest.mark.parametrize(("disk_mb", "third_round_sends"), [(1000, 0), (0, 2)])
def test_a_to_b_to_a_in_a_federated_run(
    tmp_path, server_identity, device_disks, monkeypatch, disk_mb, third_round_sends
) -> None:
    """Both devices train on keep 0.4, then 0.2, then 0.4 again: with disk for both, the third
    round sends nothing (the replies said they kept it); with none, it sends 0.4 again."""
    from strategies.control.controllers import RandomController

    script = iter([[1, 1], [2, 2], [1, 1]])
    monkeypatch.setattr(RandomController, "act", lambda self, s: next(script))
    profiles = " ".join(
        f"devices.profiles.{i}.memory_mb=400 devices.profiles.{i}.disk_mb={disk_mb}"
        for i in range(2)
    )
    cfg = compose(f"experiment=tiny controller=random rounds=3 {profiles}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["num_clients"] for r in rows[1:]] == [2, 2, 2]
    assert [r["exchanges"] for r in rows[1:]] == [2, 2, third_round_sends]
    assert [d["level"] for d in rows[3]["devices"]] == [0.4, 0.4]
    assert [d["emulator_sent"] for d in rows[3]["devices"]] == [bool(third_round_sends)] * 2
    # The cost model priced the third round as sent (or not) too.
    assert rows[3]["swaps"] == third_round_sends
