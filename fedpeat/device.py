"""The device half of a round: its profile, the budget check, training and evaluation on its
emulator (or the full model, case 3), and the caches that let a device skip work it has done.

Plain Python + torch, callable without Flower: the ClientApp only unpacks messages and calls
these. Adapter keys always travel in *full-model* layer indices; a device training on an emulator
maps them to its own indices and back (`fedpeat.emulator.to_emulator_keys` / `to_full_keys`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedpeat.cost import MiB, cache_keep
from fedpeat.data import Encoded, device_data, encode
from fedpeat.emulator import (
    EmulatorError,
    Package,
    content_hash,
    keys_on_layers,
    local_adapter_layers,
    to_emulator_keys,
    to_emulator_modules,
    to_full_keys,
    unpackage,
)
from fedpeat.emulator_cache import load_package, save_package
from fedpeat.full_ft import full_state, set_full_state, trainable_full_model
from fedpeat.lora import (
    AdapterState,
    attach_lora,
    frozen_residual,
    get_adapter_state,
    lora_model,
    set_adapter_state,
)
from fedpeat.model import cache_dir, load_tokenizer
from fedpeat.node_data import node_data
from fedpeat.protocol import NODE_FIGURES, Plan
from fedpeat.quantization import fast_bf16, quantize_frozen
from fedpeat.train import EvalResult, TrainResult, evaluate_ppl, local_train, resolve_device

_ENCODED: dict[str, tuple[list[Encoded], list[Encoded]]] = {}
# Emulator models with LoRA attached, by digest; a few per process (Ray reuses workers).
_EMULATORS: OrderedDict[str, PeftModel] = OrderedDict()
_EMULATOR_SLOTS = 4  # simulated devices share worker processes; levels differ per device
_PAD_IDS: dict[str, int] = {}


def _data_fingerprint(plan: Plan, data_path: str = "") -> list[Any]:
    """What the tokenized data depends on besides the config: a data file's size and mtime."""
    path = Path(data_path or plan.data.path) if (data_path or plan.data.path) else None
    if path is not None and path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    return []


def device_encoded(
    plan: Plan,
    partition_id: int,
    num_partitions: int,
    node_key: str | None = None,
    data_path: str = "",
) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenized (train, held-out) data of one device: cached per process and, with a
    `node_key`, on the device's disk, since a deployed ClientApp is a fresh process every round
    (tokenizing a default partition takes about 6 s here; reading it back, milliseconds).
    `data_path`: the node's own data (`fedpeat.node_data`) instead of a partition of the
    server's corpus."""
    key = json.dumps(
        [
            asdict(plan.model),
            asdict(plan.data),
            asdict(plan.partition),
            partition_id,
            num_partitions,
            data_path,
            _data_fingerprint(plan, data_path),
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
    if data_path:
        split = node_data(plan.data, data_path)
    else:
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


def _pad_id(plan: Plan) -> int:
    """The tokenizer's padding id, looked up once per model and process."""
    key = json.dumps(asdict(plan.model), sort_keys=True)
    if key not in _PAD_IDS:
        _PAD_IDS[key] = int(load_tokenizer(plan.model).pad_token_id)
    return _PAD_IDS[key]


def device_cache(node_key: str) -> Path:
    """This device's emulator cache directory (one per device, also when simulated together).

    $FEDPEAT_DEVICE_CACHE_DIR moves all device caches (tests, or a device's own disk).
    """
    root = os.environ.get("FEDPEAT_DEVICE_CACHE_DIR")
    return (Path(root) if root else cache_dir() / "emulators") / node_key


def held_emulators(node_key: str) -> list[str]:
    """Digests of the emulators this device has on disk (checked again when loaded)."""
    return sorted(p.stem for p in device_cache(node_key).glob("*.safetensors"))


def disk_budget_mb(plan: Plan, node_config: Mapping[str, Any]) -> float:
    """The disk this device gives to emulators: its node config's disk-mb, else the plan's."""
    if "disk-mb" in node_config:
        return float(node_figures(node_config)["disk-mb"])
    return plan.disk_mb


def receive_emulator(pkg: Package, node_key: str, disk_mb: float = 0.0) -> list[str]:
    """Verify and store an emulator the server sent, then keep what `disk_mb` allows of the
    others, most recently used first (`fedpeat.cost.cache_keep`). Returns the digests kept."""
    if content_hash(pkg.config_json, pkg.layers, pkg.state) != pkg.digest:
        raise EmulatorError(f"emulator {pkg.digest[:12]} arrived damaged: content hash mismatch")
    save_package(pkg, device_cache(node_key))
    return keep_recent(node_key, pkg.digest, disk_mb)


def keep_recent(node_key: str, in_use: str, disk_mb: float) -> list[str]:
    """Mark `in_use` as just used and drop the least recently used emulators beyond `disk_mb`
    (by file modification time: a device's cache survives its process). Returns the kept."""
    directory = device_cache(node_key)
    current = directory / f"{in_use}.safetensors"
    if current.is_file():
        os.utime(current)
    files = sorted(
        directory.glob("*.safetensors"),
        key=lambda p: (p == current, p.stat().st_mtime_ns, p.name),
    )
    sizes = [p.stat().st_size / MiB for p in files]
    kept = cache_keep([p.stem for p in files], sizes, disk_mb)
    for path in files:
        if path.stem not in kept:
            path.unlink(missing_ok=True)
    return sorted(kept)


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
    adapter_key = json.dumps([asdict(plan.adapter), plan.adapter_layers], sort_keys=True)
    key = f"{ref.digest}:{adapter_key}:{device}:{plan.bits}"
    if key not in _EMULATORS:
        pkg = load_package(device_cache(node_key), ref.digest)  # verifies; drops a corrupt file
        dtype = getattr(torch, plan.compute_dtype or plan.model.dtype)
        emulator = unpackage(pkg, dtype=dtype, verify=False, consume=True)
        del pkg
        quantize_frozen(emulator.model, plan.bits, device, dtype)
        adapter = plan.adapter
        if adapter.modules:  # full-model names -> this emulator's layer indices
            adapter = replace(adapter, modules=to_emulator_modules(adapter.modules, ref.layers))
        # The layers of this emulator the global adapter covers: its adapter region, or under
        # `emulator.adapt=held` every layer it holds.
        layers = (
            emulator.adapter_layers
            if plan.adapter_layers is None
            else local_adapter_layers(ref.layers, plan.adapter_layers)
        )
        _EMULATORS[key] = attach_lora(emulator.model, adapter, layers=layers)
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
    data_path: str = "",
) -> tuple[AdapterState, TrainResult, int]:
    """Train the global adapter `state` locally; return (new state, figures, train set size).

    `residual`: the rest of the global adapter beyond this device's rank, added frozen to the
    forward pass (`frozen_residual`) so the device trains at the global model."""
    device = resolve_device(plan.train.device)
    train_data, _ = device_encoded(plan, partition_id, num_partitions, node_key, data_path)
    pad_id = _pad_id(plan)
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
    data_path: str = "",
) -> tuple[EvalResult, int]:
    """Perplexity of (emulator or full model) + `state` (+ `residual`, as for training) on the
    device's held-out split."""
    device = resolve_device(plan.train.device)
    _, test_data = device_encoded(plan, partition_id, num_partitions, node_key, data_path)
    pad_id = _pad_id(plan)
    if plan.full_finetune:
        full = trainable_full_model(plan.model, device)
        set_full_state(full, state)
        t = plan.train
        result = evaluate_ppl(full, test_data, t.eval_batch_size, pad_id, device, t.loss_chunk)
        return result, len(test_data)
    model, layers = _emulator_model(plan, node_key, device)
    if layers:  # the whole global adapter; under `emulator.adapt=held` this emulator's part
        state = to_emulator_keys(keys_on_layers(state, layers), layers)
    set_adapter_state(model, state)
    with frozen_residual(model, _mapped(residual, layers)):
        t = plan.train
        result = evaluate_ppl(model, test_data, t.eval_batch_size, pad_id, device, t.loss_chunk)
    return result, len(test_data)


def _mapped(residual: AdapterState | None, layers: list[int] | None) -> AdapterState:
    if not residual:
        return {}
    return to_emulator_keys(residual, layers) if layers else residual


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
    name), checked: each must be a positive number (power-dbm: any number; disk-mb: 0 or
    more)."""
    out: dict[str, float | str] = {}
    for key in NODE_FIGURES:
        if key not in node_config:
            continue
        raw = node_config[key]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"node config {key}={raw!r} is not a number") from None
        if key == "disk-mb" and np.isfinite(value) and value >= 0:
            pass
        elif not np.isfinite(value) or (key != "power-dbm" and value <= 0):
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
    data_path: str = "",
) -> dict[str, Any]:
    """What a device tells the server about itself before its first round: partition, the
    memory it detects, compute, data size (the training examples it has under the server's
    data config, when `plan` carries one), held emulators, and the figures its node config
    gives (memory-mb caps the detection). Missing figures are absent, never guessed here."""
    device = resolve_device(plan.train.device if plan is not None else "auto")
    prof: dict[str, Any] = {
        # Names the device across restarts of its node (a new node id): its cache's name.
        "device": node_key,
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
        train, _ = device_encoded(plan, partition_id, num_partitions, node_key, data_path)
        prof["data-size"] = len(train)
    if data_path:  # the server must not count this node in a partition of its corpus
        prof["private-data"] = True
    return prof
