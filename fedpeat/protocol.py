"""Everything that crosses the wire between ServerApp and ClientApp (no Flower import): record
names, the plan a device receives, the emulator it refers to, and the node-config keys.

Query   (server -> device): ConfigRecord PLAN {"ask": "profile"}
Reply   (device -> server): ConfigRecord PROFILE {"partition-id", "num-partitions", "memory-mb"
                            (-1: unknown, the server uses its devices= profile), "compute",
                            "holds" (comma-joined digests of cached emulators)}
Train   (server -> device): ArrayRecord ADAPTER (global adapter, full-model layer indices),
                            ConfigRecord PLAN {"plan": Plan JSON, "server-round"},
                            ArrayRecord EMULATOR (only when the device lacks that emulator),
                            ArrayRecord RESIDUAL (aggregation=exact with strategy.residual: the
                            global adapter beyond the device's rank, frozen LoRA factors)
Reply   (device -> server): ArrayRecord ADAPTER (trained adapter), MetricRecord METRICS
                            {"num-examples", "train_loss", "train_s", "train_tokens", "peak_mem_mb",
                            "gpu" (CUDA index trained on, -1: CPU), "handler_s",
                            "received_eval_*" (strategy.evaluate_received)}
Evaluate (server -> device): ADAPTER, PLAN and RESIDUAL as for train
Reply   (device -> server): MetricRecord METRICS {"num-examples", "eval_loss", "eval_ppl",
                            "eval_tokens"}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import numpy as np

from fedpeat.config import (
    AdapterConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    PartitionConfig,
    TrainConfig,
)
from fedpeat.emulator import Package

ADAPTER_KEY = "adapter"
PLAN_KEY = "plan"
METRICS_KEY = "metrics"
EMULATOR_KEY = "emulator"
PROFILE_KEY = "profile"
# A train reply's ConfigRecord of the emulators the device keeps after the round.
CACHE_KEY = "cache"
HOLDS_FIELD = "holds"
RESIDUAL_KEY = "residual"
# Inside the PLAN ConfigRecord: the plan's JSON, the round, and (a query) what is asked.
PLAN_FIELD = "plan"
ROUND_FIELD = "server-round"
ASK_FIELD = "ask"

# Node-config keys that place a device's data (simulation: Flower sets them per SuperNode).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# Deployment: the node's own data file or dataset directory (`fedpeat.node_data`); with it the
# partition keys are optional and only name the node.
DATA_PATH = "data-path"
# Node-config keys a device may set about itself (deployment: `flower-supernode --node-config`).
# memory-mb caps what it detects; the others are its link and compute figures for the cost model.
# Link/compute keys -> the DeviceProfile fields they set.
NODE_LINK = {
    "gflops": "gflops",
    "bandwidth-mhz": "bandwidth_mhz",
    "power-dbm": "power_dbm",
    "distance-m": "distance_m",
}
# disk-mb: what the device gives to the emulators it keeps (0: only the one in use).
NODE_FIGURES = ("memory-mb", "disk-mb", *NODE_LINK)


@dataclass
class EmulatorRef:
    """Which emulator a device trains on; an empty digest means the full model (case 3)."""

    digest: str = ""
    keep_ratio: float = 1.0
    layers: list[int] = field(default_factory=list)
    bottom: int = 0
    top: int = 0
    n_full_layers: int = 0
    config_json: str = ""

    @classmethod
    def of(cls, pkg: Package) -> EmulatorRef:
        return cls(
            pkg.digest,
            pkg.keep_ratio,
            pkg.layers,
            pkg.bottom,
            pkg.top,
            pkg.n_full_layers,
            pkg.config_json,
        )

    def package(self, tensors: dict[str, np.ndarray]) -> Package:
        """The emulator package this ref describes, with the `tensors` that arrived with it
        (the device verifies the digest when it stores it)."""
        return Package(
            self.config_json,
            self.layers,
            self.keep_ratio,
            self.bottom,
            self.top,
            self.n_full_layers,
            tensors,
            self.digest,
        )


@dataclass
class Plan:
    """Everything a device needs for one round, built by the server."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    emulator: EmulatorRef = field(default_factory=EmulatorRef)
    adapter_layers: list[int] | None = None
    """Full-model layers that carry LoRA; None: every layer (case 3)."""
    seed: int = 42
    server_round: int = 0
    bits: int = 0
    """Width the device stores its frozen weights in (4: NF4, 8: int8, 16: bf16, 32); 0: the
    model's dtype, unquantized."""
    compute_dtype: str = ""
    """Dtype a quantized model computes in (the server's memory estimate assumed it); empty:
    the model's dtype."""
    full_finetune: bool = False
    """`fed_ft` baseline: the state is every weight of the full model, and all of it trains."""
    need_mb: float = 0.0
    """The server's estimate of this plan's training memory (cost model); 0: not checked."""
    budget_mb: float = 0.0
    """A simulated device's memory budget (its devices= profile; simulated devices share the
    host's memory); 0: the device goes by what it measures and its node config."""
    disk_mb: float = 0.0
    """The device's disk for emulators as the server knows it (its profile); the node config's
    disk-mb wins on the device. 0: it keeps only the emulator in use."""
    clipping_norm: float = 0.0
    """privacy.clipping=client: clip the update to this L2 norm before replying; 0: do not."""
    evaluate_first: bool = False
    """Evaluate the received adapter on the held-out split before training and reply with the
    figure (`strategy.evaluate_received`)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return from_dict(cls, json.loads(text))


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (nested) dataclass config from `to_dict` output; unknown keys are an error."""
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value)  # type: ignore[arg-type]
        elif get_origin(hint) is list and get_args(hint) and is_dataclass(get_args(hint)[0]):
            item = get_args(hint)[0]
            kwargs[name] = [from_dict(item, v) if isinstance(v, dict) else v for v in value]
        else:
            kwargs[name] = value
    return cls(**kwargs)
