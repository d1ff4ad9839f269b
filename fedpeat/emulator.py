"""Offsite-Tuning emulators: a layer-dropped (optionally distilled) copy of the full model.

The bottom `bottom` and top `top` decoder layers are the *adapter region*: they are kept and
carry the LoRA adapters, so an adapter trained on any emulator plugs into the full model exactly.
The middle layers are subsampled uniformly; dropped layers never leave the server.

An emulator is identified by the SHA-256 of its wire form (config, kept layer indices, tensors in
the wire dtype), so a device can check what it caches and the server knows what a device holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fedpeat.model import sharing_twin
from fedpeat.quantization import count_freed, trim_heap


class EmulatorError(ValueError):
    """An emulator cannot be built, or a cached one is missing or corrupt."""


# --------------------------------------------------------------------------- layer choice


def middle_layers(n_layers: int, bottom: int, top: int) -> list[int]:
    if bottom < 0 or top < 0 or bottom + top > n_layers:
        raise EmulatorError(
            f"emulator.bottom={bottom} + emulator.top={top} exceed the model's {n_layers} layers"
        )
    return list(range(bottom, n_layers - top))


def select_layers(
    n_layers: int,
    bottom: int,
    top: int,
    keep_ratio: float,
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Full-model indices of the layers an emulator keeps, ascending.

    All of the bottom `bottom` and top `top` layers; of the M middle layers, k = round(keep * M)
    (at least 2 when M >= 2, so the first and last middle layer always stay). Without `scores`
    the i-th kept one is middle[round(i * (M - 1) / (k - 1))], rounding half up
    (Offsite-Tuning's uniform drop); with `scores` (one per layer of the full model, higher:
    more important) the k most important middle layers, ties to the lower index.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise EmulatorError(f"keep ratio {keep_ratio} is outside (0, 1]")
    middle = middle_layers(n_layers, bottom, top)
    m = len(middle)
    k = min(m, max(2, int(keep_ratio * m + 0.5))) if m >= 2 else m
    if scores is not None:
        if len(scores) != n_layers:
            raise EmulatorError(f"{len(scores)} layer scores for a model of {n_layers} layers")
        ranked = sorted(middle, key=lambda i: (-scores[i], i))
        kept = sorted(ranked[:k])
    elif k == m:
        kept = middle
    elif k == 1:
        kept = middle[:1]
    else:
        kept = [middle[int(i * (m - 1) / (k - 1) + 0.5)] for i in range(k)]
    return list(range(bottom)) + kept + list(range(n_layers - top, n_layers))


def adapter_region(n_layers: int, bottom: int, top: int) -> list[int]:
    """Layer indices (of a model with `n_layers`) that carry adapters."""
    return list(range(bottom)) + list(range(n_layers - top, n_layers))


def global_adapter_layers(
    n_layers: int,
    bottom: int,
    top: int,
    adapt: str,
    levels: Sequence[float],
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Full-model layers the global adapter covers (`emulator.adapt`): the adapter region, or
    (`held`) every layer some emulator of `levels` holds, so each device's deltas have a home."""
    if adapt == "region":
        return adapter_region(n_layers, bottom, top)
    return sorted({i for lv in levels for i in select_layers(n_layers, bottom, top, lv, scores)})


def local_adapter_layers(
    emulator_layers: Sequence[int], adapter_layers: Sequence[int]
) -> list[int]:
    """Emulator indices of the layers that carry adapters: those whose full-model layer the
    global adapter covers."""
    covered = set(adapter_layers)
    return [j for j, full in enumerate(emulator_layers) if full in covered]


def keys_on_layers(state: Mapping[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """The entries of an adapter state (full-model keys) that live on `layers`."""
    held = set(layers)
    return {
        k: v
        for k, v in state.items()
        if (m := _LAYER_KEY.search(k)) is None or int(m.group(1)) in held
    }


# --------------------------------------------------------------------------- build


def layer_prefix(model: torch.nn.Module, n_layers: int) -> str:
    """Dotted name of the ModuleList holding the decoder layers (`model.layers` for Llama)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name:
            return name
    raise EmulatorError(f"no ModuleList of {n_layers} decoder layers found in the model")


def _subset_config(config: Any, layers: Sequence[int]) -> Any:
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(layers)
    # Per-layer attributes (e.g. sliding vs full attention) must follow the kept layers.
    for attr in ("layer_types",):
        values = getattr(cfg, attr, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(cfg, attr, [values[i] for i in layers])
    cfg.__dict__.pop("quantization_config", None)
    return cfg


def _model_from_state(
    config: Any,
    state: Mapping[str, torch.Tensor | np.ndarray],
    dtype: torch.dtype,
    consume: bool = False,
) -> PreTrainedModel:
    """Instantiate `config` without random init (buffers such as RoPE's are computed), then
    copy `state` in tensor by tensor, so a device never holds a second full copy of the
    weights; every parameter must be covered (a tied head through its embedding).

    With `consume` (`state` a dict nobody else reads), each source tensor is dropped once
    copied: the model's uninitialised tensors take memory only as they are written, so the
    load peaks near the larger of the package and the built model, not their sum."""
    from transformers.initialization import no_init_weights

    if consume:  # free heap pages reused by the new tensors would count before being written
        trim_heap()
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    target = model.state_dict()
    unexpected = sorted(set(state) - set(target))
    if unexpected:
        raise EmulatorError(f"emulator tensors do not fit its config: unexpected {unexpected[:3]}")
    filled: set[int] = set()
    freed = 0
    with torch.no_grad():
        for key in list(state):
            value = state.pop(key) if consume and isinstance(state, dict) else state[key]
            src = (
                torch.from_numpy(np.ascontiguousarray(value))
                if isinstance(value, np.ndarray)
                else value
            )
            if tuple(src.shape) != tuple(target[key].shape):
                raise EmulatorError(
                    f"emulator tensor {key}: shape {tuple(src.shape)}, "
                    f"expected {tuple(target[key].shape)}"
                )
            target[key].copy_(src)
            filled.add(target[key].untyped_storage().data_ptr())
            nbytes = src.nbytes if consume else 0
            del value, src  # with `consume`, the last reference to the package's tensor
            freed = count_freed(freed, nbytes)  # glibc keeps freed heap until asked
    missing = sorted(k for k, v in target.items() if v.untyped_storage().data_ptr() not in filled)
    # Non-persistent buffers (RoPE frequencies) are computed, not stored: they need no state.
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing:
        raise EmulatorError(f"emulator tensors do not fit its config: missing {missing[:3]}")
    return model


@dataclass
class Emulator:
    """A compressed copy of the full model, with the facts needed to map adapters back."""

    model: PreTrainedModel
    layers: list[int]
    """Full-model index of each emulator layer."""
    keep_ratio: float
    bottom: int
    top: int
    n_full_layers: int
    distilled: bool = False

    @property
    def adapter_layers(self) -> list[int]:
        """Emulator indices that carry adapters (the adapter region)."""
        return adapter_region(len(self.layers), self.bottom, self.top)


def round_trip(model: torch.nn.Module, wire_dtype: torch.dtype) -> None:
    """Round weights through the wire dtype in place, so server and device hold equal tensors."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(wire_dtype).to(p.dtype))


def build_emulator(
    full: PreTrainedModel,
    keep_ratio: float,
    bottom: int,
    top: int,
    wire_dtype: torch.dtype = torch.float16,
    scores: Sequence[float] | None = None,
) -> Emulator:
    """Drop middle layers of `full` (its weights are copied, never shared); `scores` chooses
    the kept middle layers by importance (`select_layers`)."""
    n = int(full.config.num_hidden_layers)
    layers = select_layers(n, bottom, top, keep_ratio, scores)
    prefix = layer_prefix(full, n)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {full_idx: j for j, full_idx in enumerate(layers)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in full.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor.detach().clone()
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor.detach().clone()
    config = _subset_config(full.config, layers)
    model = _model_from_state(config, state, full.dtype)
    _fix_layer_indices(model, len(layers))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    round_trip(model, wire_dtype)
    return Emulator(model, layers, keep_ratio, bottom, top, n)


def shared_emulator(
    full: PreTrainedModel,
    keep_ratio: float,
    bottom: int,
    top: int,
    wire_dtype: torch.dtype = torch.float16,
    scores: Sequence[float] | None = None,
) -> Emulator:
    """The emulator `build_emulator` makes, as a view of `full`: the embeddings, norms, head
    and adapter region are `full`'s own tensors (a twin module tree over them, nothing
    copied); only the kept middle layers are copies, rounded through the wire dtype as a device
    holds them, since distillation trains them. The server's view computes its shared part at
    the full model's precision, the wire form (and its digest) is the same as the copy's."""
    n = int(full.config.num_hidden_layers)
    layers = select_layers(n, bottom, top, keep_ratio, scores)
    model = sharing_twin(full)
    parent_name, _, attr = layer_prefix(model, n).rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    kept = []
    for j, i in enumerate(layers):
        layer = old[i]
        if bottom <= j < len(layers) - top:  # a middle layer: its own tensors
            layer = copy.deepcopy(layer)
            round_trip(layer, wire_dtype)
        kept.append(layer)
    setattr(parent, attr, torch.nn.ModuleList(kept))
    config, twin_config = _subset_config(full.config, layers), model.config
    config.dtype = full.dtype  # as a model built from the config records it (the digest)
    for module in model.modules():  # the twin's modules share one config object
        if getattr(module, "config", None) is twin_config:
            module.config = config
    _fix_layer_indices(model, len(layers))
    model.eval()
    return Emulator(model, layers, keep_ratio, bottom, top, n)


def middle_parameters(emulator: Emulator) -> dict[str, torch.nn.Parameter]:
    """The emulator's middle-layer parameters by state-dict key (what distillation changes)."""
    n_emu = len(emulator.layers)
    prefix = layer_prefix(emulator.model, n_emu)
    out = {}
    for j in range(emulator.bottom, n_emu - emulator.top):
        layer = emulator.model.get_submodule(f"{prefix}.{j}")
        out.update({f"{prefix}.{j}.{k}": p for k, p in layer.named_parameters()})
    return out


def _fix_layer_indices(model: torch.nn.Module, n_layers: int) -> None:
    """Attention modules remember their layer index for the KV cache: renumber them."""
    layers = dict(model.named_modules())[layer_prefix(model, n_layers)]
    for j, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j


# --------------------------------------------------------------------------- wire form and hash


def wire_state(
    model: torch.nn.Module, wire_dtype: torch.dtype = torch.float16
) -> dict[str, np.ndarray]:
    """The emulator's tensors as numpy in the wire dtype; tied duplicates are sent once."""
    seen: dict[int, str] = {}
    out: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = key
        out[key] = tensor.detach().to("cpu", wire_dtype).numpy().copy()
    return out


def content_hash(config_json: str, layers: Sequence[int], state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over config, kept layer indices and every tensor (name, dtype, shape, bytes)."""
    h = hash_start(config_json, layers)
    for key in sorted(state):
        hash_tensor(h, key, state[key])
    return h.hexdigest()


def hash_start(config_json: str, layers: Sequence[int]) -> Any:
    """`content_hash` in parts, for a reader that streams the tensors: the header first, then
    `hash_tensor` for each tensor in sorted key order."""
    h = hashlib.sha256()
    h.update(config_json.encode())
    h.update(json.dumps(list(layers)).encode())
    return h


def hash_tensor(h: Any, key: str, value: np.ndarray) -> None:
    arr = np.ascontiguousarray(value)
    h.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
    h.update(arr.data)  # the buffer itself, no copy


@dataclass
class Package:
    """What travels to a device: config, layer map and tensors; `digest` names it."""

    config_json: str
    layers: list[int]
    keep_ratio: float
    bottom: int
    top: int
    n_full_layers: int
    state: dict[str, np.ndarray]
    digest: str

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.state.values()))

    def meta(self) -> dict[str, Any]:
        return {
            "config": self.config_json,
            "layers": self.layers,
            "keep_ratio": self.keep_ratio,
            "bottom": self.bottom,
            "top": self.top,
            "n_full_layers": self.n_full_layers,
            "digest": self.digest,
        }


def package(emulator: Emulator, wire_dtype: torch.dtype = torch.float16) -> Package:
    config_json = emulator.model.config.to_json_string(use_diff=False)
    state = wire_state(emulator.model, wire_dtype)
    digest = content_hash(config_json, emulator.layers, state)
    return Package(
        config_json,
        list(emulator.layers),
        emulator.keep_ratio,
        emulator.bottom,
        emulator.top,
        emulator.n_full_layers,
        state,
        digest,
    )


def unpackage(
    pkg: Package, dtype: torch.dtype = torch.float32, verify: bool = True, consume: bool = False
) -> Emulator:
    """Rebuild the emulator model from its wire form (checking the digest unless told not to).

    `consume` empties `pkg.state` tensor by tensor as the model is filled (a device's load:
    the package is not needed afterwards, and holding it beside the model doubled the peak)."""
    if verify:
        actual = content_hash(pkg.config_json, pkg.layers, pkg.state)
        if actual != pkg.digest:
            raise EmulatorError(
                f"emulator {pkg.digest[:12]}: content hash mismatch ({actual[:12]})"
            )
    config = AutoConfig.for_model(**json.loads(pkg.config_json))
    model = _model_from_state(config, pkg.state, dtype, consume=consume)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Emulator(model, pkg.layers, pkg.keep_ratio, pkg.bottom, pkg.top, pkg.n_full_layers)


# --------------------------------------------------------------------------- adapter keys

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def remap_layers(
    state: Mapping[str, np.ndarray], mapping: Mapping[int, int]
) -> dict[str, np.ndarray]:
    """Rename adapter keys' layer indices through `mapping` (emulator <-> full model).

    Keys whose layer is not in `mapping` are an error: adapters live only in the adapter region.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = _LAYER_KEY.search(key)
        if m is None:
            out[key] = value
            continue
        idx = int(m.group(1))
        if idx not in mapping:
            raise EmulatorError(f"adapter key {key} is on layer {idx}, outside the adapter region")
        out[key[: m.start()] + f".layers.{mapping[idx]}." + key[m.end() :]] = value
    return out


def to_emulator_keys(
    state: Mapping[str, np.ndarray], emulator_layers: Sequence[int]
) -> dict[str, np.ndarray]:
    """Global (full-model) adapter keys -> this emulator's layer indices."""
    return remap_layers(state, {full: j for j, full in enumerate(emulator_layers)})


def to_full_keys(
    state: Mapping[str, np.ndarray], emulator_layers: Sequence[int]
) -> dict[str, np.ndarray]:
    """This emulator's adapter keys -> full-model layer indices."""
    return remap_layers(state, dict(enumerate(emulator_layers)))


def to_emulator_modules(modules: Sequence[str], emulator_layers: Sequence[int]) -> list[str]:
    """Weight-matrix names (`layers.28.self_attn.q_proj`, full-model indices) -> this emulator's
    indices; a name outside the emulator is an error."""
    mapping = {full: j for j, full in enumerate(emulator_layers)}
    renamed = remap_layers({"." + name: np.zeros(0) for name in modules}, mapping)
    return [key[1:] for key in renamed]
