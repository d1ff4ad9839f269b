"""The device side: what a node reports about itself, and its disk cache of tokenized data."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedpeat.device import available_memory_mb, node_figures
from tests.helpers import plan_of


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


def test_a_fresh_client_process_reads_its_tokenized_partition_from_disk(
    tiny_cfg, tmp_path, monkeypatch
) -> None:
    # Deployment starts a fresh ClientApp process every round: it must not tokenize again.
    import fedpeat.device as dev

    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dev, "_ENCODED", {})
    plan = plan_of(tiny_cfg, 1)
    first = dev.device_encoded(plan, 1, 3, "device-1")
    assert len(list((tmp_path / "device-1" / "data").glob("*.json"))) == 1

    def no_data(*_args, **_kwargs):
        raise AssertionError("re-read and re-tokenized the partition")

    monkeypatch.setattr(dev, "_ENCODED", {})  # a new process
    monkeypatch.setattr(dev, "device_data", no_data)
    assert dev.device_encoded(plan, 1, 3, "device-1") == first
    # Another partition, or the same one under another data config, is not served from it.
    with pytest.raises(AssertionError, match="re-tokenized"):
        dev.device_encoded(plan, 2, 3, "device-1")
    shorter = replace(plan, data=replace(plan.data, max_length=plan.data.max_length // 2))
    with pytest.raises(AssertionError, match="re-tokenized"):
        dev.device_encoded(shorter, 1, 3, "device-1")
