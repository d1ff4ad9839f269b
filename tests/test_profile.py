"""Device profiles: what a node reports about itself, and what the server makes of it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedpeat.config import DeviceProfile
from fedpeat.task import available_memory_mb, node_figures
from strategies.planning import profile_of

SIM = DeviceProfile(
    name="phone", memory_mb=900, gflops=40, bandwidth_mhz=2, power_dbm=23, distance_m=80
)


def test_node_figures_reads_and_checks_the_node_config() -> None:
    figures = node_figures(
        {"partition-id": 0, "memory-mb": "800", "distance-m": 120, "power-dbm": -3, "profile": "a"}
    )
    assert figures == {"memory-mb": 800.0, "distance-m": 120.0, "power-dbm": -3.0, "profile": "a"}
    with pytest.raises(ValueError, match="memory-mb='lots' is not a number"):
        node_figures({"memory-mb": "lots"})
    with pytest.raises(ValueError, match="bandwidth-mhz=0 must be a positive number"):
        node_figures({"bandwidth-mhz": 0})


def test_available_memory_is_positive_on_this_host() -> None:
    assert available_memory_mb(torch.device("cpu")) > 0


def test_simulated_node_takes_budget_and_link_from_the_devices_profile() -> None:
    # Detection sees the shared host, not a simulated device: the devices= profile decides.
    prof, assumed = profile_of({"detected-memory-mb": 20000.0, "bf16": False}, SIM)
    assert prof.memory_mb == 900 and prof.gflops == 40 and prof.distance_m == 80
    assert assumed == ["memory_mb", "gflops", "bandwidth_mhz", "power_dbm", "distance_m"]
    # A node config budget and figures win over the devices= profile.
    prof, assumed = profile_of({"memory-mb": 500.0, "distance-m": 30.0}, SIM)
    assert (prof.memory_mb, prof.distance_m, prof.gflops) == (500, 30, 40)
    assert "memory_mb" not in assumed and "distance_m" not in assumed


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
            "profile": "sensor",
        },
        SIM,
        from_nodes=True,
    )
    assert assumed == [] and prof.name == "sensor" and prof.bandwidth_mhz == 0.5


def test_a_fresh_client_process_reads_its_tokenized_partition_from_disk(
    tiny_cfg, tmp_path, monkeypatch
) -> None:
    # Deployment starts a fresh ClientApp process every round: it must not tokenize again.
    from fedpeat import task

    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(task, "_ENCODED", {})
    plan = task.Plan.from_config(tiny_cfg, 1)
    first = task.device_encoded(plan, 1, 3, "device-1")
    assert len(list((tmp_path / "device-1" / "data").glob("*.json"))) == 1

    def no_data(*_args, **_kwargs):
        raise AssertionError("re-read and re-tokenized the partition")

    monkeypatch.setattr(task, "_ENCODED", {})  # a new process
    monkeypatch.setattr(task, "device_data", no_data)
    assert task.device_encoded(plan, 1, 3, "device-1") == first
    # Another partition, or the same one under another data config, is not served from it.
    with pytest.raises(AssertionError, match="re-tokenized"):
        task.device_encoded(plan, 2, 3, "device-1")
    shorter = replace(plan, data=replace(plan.data, max_length=plan.data.max_length // 2))
    with pytest.raises(AssertionError, match="re-tokenized"):
        task.device_encoded(shorter, 1, 3, "device-1")
