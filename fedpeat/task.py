"""What one device does in a round, and what the server does: the ML side of the app.

The server sends each device a `Plan` (the resolved config sections it needs, and which emulator
to train on); the device never composes config itself. Everything here is plain Python + torch,
callable without Flower.

Adapter keys always travel in *full-model* layer indices; a device training on an emulator maps
them to its own indices and back (`fedpeat.emulator.to_emulator_keys` / `to_full_keys`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedpeat.config import (
    AdapterConfig,
    Config,
    DataConfig,
    ModelConfig,
    PartitionConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from fedpeat.cost import MiB, ModelShape, training_memory_bytes
from fedpeat.data import Encoded, device_data, encode, server_data, server_train_data
from fedpeat.emulator import (
    Emulator,
    EmulatorError,
    Package,
    adapter_region,
    build_emulator,
    content_hash,
    layer_prefix,
    load_package,
    package,
    prune_cache,
    round_trip,
    save_package,
    select_layers,
    to_emulator_keys,
    to_emulator_modules,
    to_full_keys,
    unpackage,
)
from fedpeat.full_ft import full_state, set_full_state, trainable_full_model
from fedpeat.importance import (
    candidate_modules,
    choose_modules,
    importance_scores,
    lora_params,
    top_share,
)
from fedpeat.lora import (
    AdapterState,
    attach_lora,
    frozen_residual,
    get_adapter_state,
    lora_model,
    set_adapter_state,
)
from fedpeat.model import cache_dir, load_model, load_tokenizer, resolve_device, shape_of
from fedpeat.quantization import fast_bf16, quantize_frozen
from fedpeat.train import EvalResult, TrainResult, evaluate_ppl, local_train


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
    clipping_norm: float = 0.0
    """privacy.clipping=client: clip the update to this L2 norm before replying; 0: do not."""

    @classmethod
    def from_config(
        cls, cfg: Config, server_round: int, emulator: EmulatorRef | None = None
    ) -> Plan:
        return cls(
            cfg.model,
            cfg.data,
            cfg.partition,
            cfg.adapter,
            cfg.train,
            emulator or EmulatorRef(),
            None,
            cfg.seed,
            server_round,
        )

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return from_dict(cls, json.loads(text))


# --------------------------------------------------------------------------- device side

_ENCODED: dict[str, tuple[list[Encoded], list[Encoded]]] = {}
# Emulator models with LoRA attached, by digest; a few per process (Ray reuses workers).
_EMULATORS: OrderedDict[str, PeftModel] = OrderedDict()
_EMULATOR_SLOTS = 4  # simulated devices share worker processes; levels differ per device


def _data_fingerprint(plan: Plan) -> list[Any]:
    """What the tokenized data depends on besides the config: a data file's size and mtime."""
    path = Path(plan.data.path) if plan.data.path else None
    if path is not None and path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    return []


def device_encoded(
    plan: Plan, partition_id: int, num_partitions: int, node_key: str | None = None
) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenized (train, held-out) data of one device: cached per process and, with a
    `node_key`, on the device's disk, since a deployed ClientApp is a fresh process every round
    (tokenizing a default partition takes about 6 s here; reading it back, milliseconds)."""
    key = json.dumps(
        [
            to_dict(plan.model),
            to_dict(plan.data),
            to_dict(plan.partition),
            partition_id,
            num_partitions,
            _data_fingerprint(plan),
        ],
        sort_keys=True,
    )
    if key in _ENCODED:
        return _ENCODED[key]
    disk = None
    if node_key is not None:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        disk = device_cache(node_key) / "data" / f"{digest}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(disk.read_text())
            _ENCODED[key] = (
                [Encoded(ids, labels) for ids, labels in saved["train"]],
                [Encoded(ids, labels) for ids, labels in saved["test"]],
            )
            return _ENCODED[key]
    tok = load_tokenizer(plan.model)
    split = device_data(plan.data, plan.partition, partition_id, num_partitions)
    test = split.test[: plan.data.device_eval_samples]
    _ENCODED[key] = (
        encode(split.train, tok, plan.data.max_length),
        encode(test, tok, plan.data.max_length),
    )
    if disk is not None:
        train, held = _ENCODED[key]
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "train": [[e.input_ids, e.labels] for e in train],
                    "test": [[e.input_ids, e.labels] for e in held],
                }
            )
        )
        tmp.replace(disk)  # atomic: a reader sees the whole file or none
    return _ENCODED[key]


def device_cache(node_key: str) -> Path:
    """This device's emulator cache directory (one per device, also when simulated together).

    $FEDPEAT_DEVICE_CACHE_DIR moves all device caches (tests, or a device's own disk).
    """
    root = os.environ.get("FEDPEAT_DEVICE_CACHE_DIR")
    return (Path(root) if root else cache_dir() / "emulators") / node_key


def held_emulators(node_key: str) -> list[str]:
    """Digests of the emulators this device has on disk (checked again when loaded)."""
    return sorted(p.stem for p in device_cache(node_key).glob("*.safetensors"))


def receive_emulator(pkg: Package, node_key: str) -> None:
    """Verify and store an emulator the server sent; it replaces whatever the device held."""
    if content_hash(pkg.config_json, pkg.layers, pkg.state) != pkg.digest:
        raise EmulatorError(f"emulator {pkg.digest[:12]} arrived damaged: content hash mismatch")
    directory = device_cache(node_key)
    save_package(pkg, directory)
    prune_cache(directory, [pkg.digest])


def _emulator_model(
    plan: Plan, node_key: str, device: torch.device
) -> tuple[PeftModel, list[int] | None]:
    """The model this round trains: the full model (case 3) or the planned emulator, with LoRA.

    Returns the model and the emulator's layer map (None for the full model).
    """
    ref = plan.emulator
    if not ref.digest:
        dtype = getattr(torch, plan.compute_dtype or plan.model.dtype)
        model = lora_model(plan.model, plan.adapter, device, plan.adapter_layers, plan.bits, dtype)
        return model, None
    key = f"{ref.digest}:{json.dumps(to_dict(plan.adapter), sort_keys=True)}:{device}:{plan.bits}"
    if key not in _EMULATORS:
        pkg = load_package(device_cache(node_key), ref.digest)  # verifies; drops a corrupt file
        dtype = getattr(torch, plan.compute_dtype or plan.model.dtype)
        emulator = unpackage(pkg, dtype=dtype, verify=False)
        quantize_frozen(emulator.model, plan.bits, device, dtype)
        adapter = plan.adapter
        if adapter.modules:  # full-model names -> this emulator's layer indices
            adapter = replace(adapter, modules=to_emulator_modules(adapter.modules, ref.layers))
        _EMULATORS[key] = attach_lora(emulator.model, adapter, layers=emulator.adapter_layers)
        while len(_EMULATORS) > _EMULATOR_SLOTS:
            _EMULATORS.popitem(last=False)
    _EMULATORS.move_to_end(key)
    return _EMULATORS[key], ref.layers


class MemoryBudgetError(RuntimeError):
    """A plan needs more memory than the device has: refused before training starts."""


def check_budget(plan: Plan, node_config: Mapping[str, Any]) -> None:
    """Refuse a plan whose estimated training memory exceeds what this device has: its measured
    free memory, capped by its node config's `memory-mb` and, simulated, by its profile budget.
    Better a clear error the server records than an out-of-memory kill mid-round."""
    if plan.need_mb <= 0:
        return
    device = resolve_device(plan.train.device)
    measured = available_memory_mb(device)
    limits = {"measured free memory": measured} if measured > 0 else {}  # -1: cannot tell
    if "memory-mb" in node_config:
        limits["node config memory-mb"] = float(node_figures(node_config)["memory-mb"])
    if plan.budget_mb > 0:
        limits["simulated device budget"] = plan.budget_mb
    if not limits:
        return
    source, budget = min(limits.items(), key=lambda kv: kv[1])
    if plan.need_mb > budget:
        raise MemoryBudgetError(
            f"memory budget {budget:.0f} MB ({source}) < {plan.need_mb:.0f} MB estimated for "
            f"this plan (rank {plan.adapter.r}, batch {plan.train.batch_size}, "
            f"bits {plan.bits or 'model dtype'}, keep {plan.emulator.keep_ratio or 1.0}); "
            "not training"
        )


def device_train(
    plan: Plan,
    partition_id: int,
    num_partitions: int,
    state: AdapterState,
    node_key: str,
    residual: AdapterState | None = None,
) -> tuple[AdapterState, TrainResult, int]:
    """Train the global adapter `state` locally; return (new state, figures, train set size).

    `residual`: the rest of the global adapter beyond this device's rank, added frozen to the
    forward pass (`frozen_residual`) so the device trains at the global model."""
    device = resolve_device(plan.train.device)
    train_data, _ = device_encoded(plan, partition_id, num_partitions, node_key)
    pad_id = int(load_tokenizer(plan.model).pad_token_id)
    # Per-device, per-round seed: devices draw different batches, reruns draw the same ones.
    seed = plan.seed + 1000 * plan.server_round + partition_id
    if plan.full_finetune:
        full = trainable_full_model(plan.model, device)
        set_full_state(full, state)
        result = local_train(full, train_data, plan.train, seed, pad_id, device)
        return full_state(full), result, len(train_data)
    model, layers = _emulator_model(plan, node_key, device)
    set_adapter_state(model, to_emulator_keys(state, layers) if layers else state)
    with frozen_residual(model, _mapped(residual, layers)):
        result = local_train(model, train_data, plan.train, seed, pad_id, device)
    new_state = get_adapter_state(model)
    return (to_full_keys(new_state, layers) if layers else new_state), result, len(train_data)


def device_evaluate(
    plan: Plan,
    partition_id: int,
    num_partitions: int,
    state: AdapterState,
    node_key: str,
    residual: AdapterState | None = None,
) -> tuple[EvalResult, int]:
    """Perplexity of (emulator or full model) + `state` (+ `residual`, as for training) on the
    device's held-out split."""
    device = resolve_device(plan.train.device)
    _, test_data = device_encoded(plan, partition_id, num_partitions, node_key)
    pad_id = int(load_tokenizer(plan.model).pad_token_id)
    if plan.full_finetune:
        full = trainable_full_model(plan.model, device)
        set_full_state(full, state)
        return evaluate_ppl(full, test_data, plan.train.eval_batch_size, pad_id, device), len(
            test_data
        )
    model, layers = _emulator_model(plan, node_key, device)
    set_adapter_state(model, to_emulator_keys(state, layers) if layers else state)
    with frozen_residual(model, _mapped(residual, layers)):
        result = evaluate_ppl(model, test_data, plan.train.eval_batch_size, pad_id, device)
    return result, len(test_data)


def _mapped(residual: AdapterState | None, layers: list[int] | None) -> AdapterState:
    if not residual:
        return {}
    return to_emulator_keys(residual, layers) if layers else residual


# Node-config keys a device may set about itself (deployment: `flower-supernode --node-config`).
# memory-mb caps what it detects; the others are its link and compute figures for the cost model.
# Link/compute keys -> the DeviceProfile fields they set.
NODE_LINK = {
    "gflops": "gflops",
    "bandwidth-mhz": "bandwidth_mhz",
    "power-dbm": "power_dbm",
    "distance-m": "distance_m",
}
NODE_FIGURES = ("memory-mb", *NODE_LINK)


def available_memory_mb(device: torch.device) -> float:
    """Memory this device could give training now: free CUDA memory on a GPU, the kernel's
    MemAvailable (free plus reclaimable cache) on a CPU; -1 when neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory PyTorch holds in its cache for this process is free to reuse here.
        return (
            free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        ) / MiB
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MiB
    except (ValueError, OSError):
        return -1.0


def node_figures(node_config: Mapping[str, Any]) -> dict[str, float | str]:
    """The figures a node's config sets about the device (`NODE_FIGURES`, and `profile`, a
    name), checked: each must be a positive number (power-dbm: any number)."""
    out: dict[str, float | str] = {}
    for key in NODE_FIGURES:
        if key not in node_config:
            continue
        raw = node_config[key]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"node config {key}={raw!r} is not a number") from None
        if not np.isfinite(value) or (key != "power-dbm" and value <= 0):
            raise ValueError(f"node config {key}={raw!r} must be a positive number")
        out[key] = value
    if "profile" in node_config:
        out["profile"] = str(node_config["profile"])
    return out


def device_profile(
    node_key: str,
    partition_id: int,
    num_partitions: int,
    node_config: Mapping[str, Any],
    plan: Plan | None = None,
) -> dict[str, Any]:
    """What a device tells the server about itself before its first round: partition, the
    memory it detects, compute, data size (the training examples it has under the server's
    data config, when `plan` carries one), held emulators, and the figures its node config
    gives (memory-mb caps the detection). Missing figures are absent, never guessed here."""
    device = resolve_device(plan.train.device if plan is not None else "auto")
    prof: dict[str, Any] = {
        "partition-id": partition_id,
        "num-partitions": num_partitions,
        "detected-memory-mb": available_memory_mb(device),
        "compute": device.type,
        "bf16": fast_bf16(device),
        # A comma-joined string, not a list: Flower cannot size an empty list in a ConfigRecord.
        "holds": ",".join(held_emulators(node_key)),
    }
    prof |= node_figures(node_config)
    if plan is not None:
        train, _ = device_encoded(plan, partition_id, num_partitions, node_key)
        prof["data-size"] = len(train)
    return prof


# --------------------------------------------------------------------------- server side


class ServerModel:
    """The full model with the global adapter, the server's data, and the emulator factory."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.held_out = encode(server_data(cfg.data), self.tokenizer, cfg.data.max_length)
        if not self.held_out:
            raise ValueError("the server's held-out set is empty after tokenization")
        self.train_data = encode(server_train_data(cfg.data), self.tokenizer, cfg.data.max_length)
        self.base = load_model(cfg.model, self.device)
        n_layers = int(self.base.config.num_hidden_layers)
        e = cfg.emulator
        # Cases 1 and 2 put adapters on the adapter region only, so they exist in every emulator.
        self.adapter_layers = None if e.case == 3 else adapter_region(n_layers, e.bottom, e.top)
        self.scores: dict[str, float] = {}
        self.importance: dict[str, Any] = {}
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.model_bits = torch.finfo(getattr(torch, cfg.model.dtype)).bits
        self.adapter_cfg = self._global_adapter() if cfg.planner.enabled else cfg.adapter
        self.model = lora_model(cfg.model, self.adapter_cfg, self.device, self.adapter_layers)
        # Fresh LoRA: A random (seeded), B zero, so the plug-in starts equal to the base model.
        self.initial_state = initial_adapter_state(get_adapter_state(self.model), cfg.seed)
        self.full_ft = cfg.strategy.name == "fed_ft"
        if self.full_ft:  # the state is the whole model, starting from the base weights
            self.full = trainable_full_model(cfg.model, self.device)
            self.initial_state = full_state(self.full)
        self.adapter_params = int(sum(v.size for v in self.initial_state.values()))
        prefix = dict(self.base.named_modules())[layer_prefix(self.base, n_layers)]
        self._layer_params = [sum(p.numel() for p in layer.parameters()) for layer in prefix]
        self.full_shape = shape_of(self.base)  # the planner asks for shapes hundreds of times
        self._layer_linear = [
            sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
            for layer in prefix
        ]
        self._packages: dict[float, Package] = {}
        self.emulators: dict[float, Emulator] = {}

    # -- FedPipe: which matrices carry LoRA

    def _global_adapter(self) -> AdapterConfig:
        """The global adapter under the planner: rank `planner.server_rank` (same alpha / r
        scale), on the fixed `adapter.modules` or on the matrices importance chooses."""
        pl, a = self.cfg.planner, self.cfg.adapter
        candidates = candidate_modules(self.base, pl.candidates, self.adapter_layers)
        self.module_shapes = {n: (m.out_features, m.in_features) for n, m in candidates.items()}
        calibration = self.train_data or self.held_out
        self.scores = importance_scores(
            self.base,
            candidates,
            calibration,
            self.cfg.train.batch_size,
            pl.calibration_batches,
            self.pad_id,
            self.device,
        )
        costs = {n: lora_params(self.module_shapes, [n], pl.server_rank) for n in candidates}
        budget = pl.budget_fraction * sum(costs.values())
        if a.modules:
            unknown = [m for m in a.modules if m not in candidates]
            if unknown:
                raise ValueError(
                    f"adapter.modules {unknown[:3]} are not candidate matrices in the adapter "
                    f"layers {self.adapter_layers}; e.g. {next(iter(candidates))}"
                )
            chosen, how = list(a.modules), "fixed by adapter.modules"
        else:
            chosen, how = choose_modules(self.scores, costs, budget), "importance"
        self.importance = {
            "method": "mean over calibration batches of sum |W * dL/dW|",
            "calibration_batches": pl.calibration_batches,
            "server_rank": pl.server_rank,
            "budget_params": budget,
            "chosen_params": sum(costs[m] for m in chosen),
            "choice": how,
            "chosen": chosen,
            "scores": dict(sorted(self.scores.items(), key=lambda kv: -kv[1])),
        }
        scale = a.alpha / a.r
        return replace(a, r=pl.server_rank, alpha=scale * pl.server_rank, modules=chosen)

    def device_adapter(self, rank: int, share: float) -> AdapterConfig:
        """A device's adapter: the most important `share` of the global modules at `rank`, with
        the global alpha / r scale (so truncations and aggregates need no rescaling)."""
        g = self.adapter_cfg
        modules = top_share(self.scores, g.modules, share)
        return replace(g, r=rank, alpha=g.alpha / g.r * rank, modules=modules)

    def adapter_params_of(self, adapter: AdapterConfig) -> int:
        """LoRA parameters of `adapter` (explicit modules) on this model."""
        return lora_params(self.module_shapes, adapter.modules, adapter.r)

    # -- evaluation and training on the full model

    def _load(self, state: AdapterState) -> torch.nn.Module:
        """The full model carrying `state` (the adapter, or under fed_ft every weight)."""
        if self.full_ft:
            set_full_state(self.full, state)
            return self.full
        set_adapter_state(self.model, state)
        return self.model

    def evaluate(self, state: AdapterState) -> EvalResult:
        model = self._load(state)
        return evaluate_ppl(
            model, self.held_out, self.cfg.train.eval_batch_size, self.pad_id, self.device
        )

    def train(
        self, state: AdapterState, server_round: int
    ) -> tuple[AdapterState, TrainResult, int]:
        """The server's own local update on the full model (collaborative tuning)."""
        if not self.train_data:
            raise ValueError("the server has no training data (data.server_train_fraction=0)")
        model = self._load(state)
        seed = self.cfg.seed + 1000 * server_round + 999_983  # distinct from every device's seed
        result = local_train(model, self.train_data, self.cfg.train, seed, self.pad_id, self.device)
        new = full_state(self.full) if self.full_ft else get_adapter_state(self.model)
        return new, result, len(self.train_data)

    # -- emulators

    def emulator(self, level: float) -> Emulator:
        """The emulator at keep ratio `level`, built (and distilled if configured) once."""
        if level not in self.emulators:
            e = self.cfg.emulator
            wire = getattr(torch, e.wire_dtype)
            emulator = build_emulator(self.base, level, e.bottom, e.top, wire)
            if e.distill.enabled and len(emulator.layers) < emulator.n_full_layers:
                from fedpeat.distill import distill

                distill(emulator, self.base, self.train_data, e.distill, self.pad_id, self.device)
                emulator.distilled = True
                round_trip(emulator.model, wire)
            self.emulators[level] = emulator
        return self.emulators[level]

    def package(self, level: float) -> Package:
        if level not in self._packages:
            self._packages[level] = package(
                self.emulator(level), getattr(torch, self.cfg.emulator.wire_dtype)
            )
        return self._packages[level]

    def package_digests(self) -> dict[float, str]:
        """Level -> digest of every emulator package built so far."""
        return {level: pkg.digest for level, pkg in self._packages.items()}

    def emulator_shape(self, level: float | None) -> ModelShape:
        """Shape of the emulator at `level` (None: the full model) without building it."""
        full = self.full_shape
        if level is None:
            return full
        e = self.cfg.emulator
        kept = set(select_layers(full.layers, e.bottom, e.top, level))
        dropped = sum(n for i, n in enumerate(self._layer_params) if i not in kept)
        dropped_linear = sum(n for i, n in enumerate(self._layer_linear) if i not in kept)
        return replace(
            full,
            params=full.params - dropped,
            layers=len(kept),
            linear_params=full.linear_params - dropped_linear,
        )

    def memory_need_mb(
        self,
        level: float | None,
        bits: int = 0,
        batch: int = 0,
        adapter_params: int | None = None,
        compute_bits: int | None = None,
    ) -> float:
        """Estimated training memory of one step on the emulator at `level` (None: full model)
        with frozen weights at `bits` (0: the model dtype), `batch` (0: train.batch_size),
        `adapter_params` (None: the global adapter's) and activations and unquantized weights
        at `compute_bits` (None: 16 for bits=16, else the model's); plus planner.runtime_mb."""
        shape = self.emulator_shape(level)
        model_bits = torch.finfo(getattr(torch, self.cfg.model.dtype)).bits
        bits = bits or model_bits
        if compute_bits is None:
            compute_bits = 16 if bits == 16 else model_bits
        need = training_memory_bytes(
            shape,
            self.adapter_params if adapter_params is None else adapter_params,
            batch or self.cfg.train.batch_size,
            self.cfg.data.max_length,
            bits,
            act_bytes=compute_bits // 8,
            compute_bits=compute_bits,
        )
        return need / MiB + self.cfg.planner.runtime_mb

    def emulator_ppl(self, level: float, state: AdapterState | None = None) -> EvalResult:
        """Perplexity of the emulator (+ adapter `state`) on the server's held-out data."""
        emulator = self.emulator(level)
        model: torch.nn.Module = emulator.model
        if state is not None:
            model = attach_lora(emulator.model, self.cfg.adapter, layers=emulator.adapter_layers)
            set_adapter_state(model, to_emulator_keys(state, emulator.layers))
        try:
            return evaluate_ppl(
                model, self.held_out, self.cfg.train.eval_batch_size, self.pad_id, self.device
            )
        finally:
            if isinstance(model, PeftModel):
                model.unload()

    def save_merged(self, state: AdapterState, directory: str) -> None:
        """Write the full model with `state` merged into its weights, plus the tokenizer: a
        plain transformers model (no PEFT needed, and no adapter cost in the forward pass).
        Under fed_ft: the fine-tuned model itself."""
        if self.full_ft:
            set_full_state(self.full, state)
            self.full.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            return
        base = load_model(self.cfg.model, self.device, cached=False)
        peft_model = attach_lora(base, self.adapter_cfg, layers=self.adapter_layers)
        set_adapter_state(peft_model, state)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_adapter(self, state: AdapterState, directory: str, base_location: str) -> None:
        """Write a standard PEFT adapter directory for `state`."""
        set_adapter_state(self.model, state)
        self.model.peft_config["default"].base_model_name_or_path = base_location
        self.model.save_pretrained(directory)


def initial_adapter_state(template: AdapterState, seed: int) -> AdapterState:
    """A from `seed` with PEFT's Kaiming-uniform bound 1/sqrt(fan_in), B zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in template.items():
        if "lora_A" in key:
            bound = 1.0 / np.sqrt(value.shape[1])
            out[key] = rng.uniform(-bound, bound, value.shape).astype(np.float32)
        else:
            out[key] = np.zeros_like(value)
    return out
