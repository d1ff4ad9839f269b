"""LoRA adapters on the frozen base model: attach, and paired get/set of the adapter state.

The adapter state is a flat `{key: float32 ndarray}` dict with PEFT's own key names (adapter name
stripped), so it travels as a Flower ArrayRecord and saves as a standard PEFT adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, cast

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fedpeat.config import AdapterConfig, ModelConfig
from fedpeat.model import load_model
from fedpeat.quantization import quantize_frozen

AdapterState = dict[str, np.ndarray]

_LORA_MODELS: dict[str, PeftModel] = {}


class AdapterStateError(ValueError):
    """An adapter state does not fit the model (keys, shapes or values)."""


def lora_config(cfg: AdapterConfig, layers: Sequence[int] | None = None) -> LoraConfig:
    """PEFT config; `layers` restricts the adapters to those decoder layers (None: all).

    With explicit `cfg.modules` (`layers.28.self_attn.q_proj`) those matrices alone get LoRA:
    PEFT matches a list entry against the end of a module's dotted name.
    """
    explicit = bool(cfg.modules)
    return LoraConfig(
        r=cfg.r,
        # PEFT types alpha as int but only divides by it: a device's alpha keeps alpha / r.
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.modules) if explicit else list(cfg.target_modules),
        layers_to_transform=list(layers) if layers is not None and not explicit else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(
    base: torch.nn.Module, cfg: AdapterConfig, seed: int = 0, layers: Sequence[int] | None = None
) -> PeftModel:
    """Wrap `base` with fresh LoRA layers (A random with `seed`, B zero: a no-op at start)."""
    full_names = [name for name, _ in base.named_modules()]
    if cfg.modules:
        absent = [m for m in cfg.modules if not any(n.endswith("." + m) for n in full_names)]
        if absent:
            raise AdapterStateError(
                f"adapter.modules {absent[:3]} are not weight matrices of the model "
                f"(names look like {next(n for n in full_names if n.endswith('q_proj'))})"
            )
    names = {name.rsplit(".", 1)[-1] for name in full_names}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing and not cfg.modules:
        raise AdapterStateError(
            f"adapter.target_modules {missing} are not modules of the model; "
            f"linear layers it has include {sorted(n for n in names if n.endswith('proj'))}"
        )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(base, lora_config(cfg, layers))
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def lora_model(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    device: torch.device | str = "cpu",
    layers: Sequence[int] | None = None,
    bits: int = 0,
    dtype: torch.dtype | None = None,
) -> PeftModel:
    """A LoRA-wrapped copy of the full base model, cached per process (clients reuse it).

    `bits` quantizes its frozen weights, computing in `dtype` (`fedpeat.quantization`; 0: as
    loaded). Its adapter
    weights are always overwritten with `set_adapter_state` before use.
    """
    key = json.dumps(
        [asdict(model_cfg), asdict(adapter_cfg), str(device), layers, bits, str(dtype)],
        sort_keys=True,
    )
    if key not in _LORA_MODELS:
        # An uncached base: get_peft_model injects layers in place, and the plain cached base
        # must stay plain (emulators are cut from it).
        base = load_model(model_cfg, "cpu" if bits else device, cached=False)
        if bits:
            quantize_frozen(base, bits, torch.device(device), dtype)
        _LORA_MODELS[key] = attach_lora(base, adapter_cfg, layers=layers)
    return _LORA_MODELS[key]


def get_adapter_state(model: PeftModel) -> AdapterState:
    """The adapter's tensors as float32 numpy arrays (bf16 cannot become numpy)."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def check_adapter_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any]) -> None:
    """Raise AdapterStateError unless `state` has exactly the expected keys, shapes, finiteness."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterStateError(
            f"adapter keys differ: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for key, shape in expected.items():
        arr = np.asarray(state[key])
        if tuple(arr.shape) != tuple(shape):
            raise AdapterStateError(f"{key}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise AdapterStateError(f"{key}: non-finite values")


def state_shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def set_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Load `state` into the model's adapter after checking it matches exactly."""
    current = get_peft_model_state_dict(model)
    check_adapter_state({k: tuple(v.shape) for k, v in current.items()}, state)
    device = next(iter(current.values())).device
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(state[k])).to(device, current[k].dtype)
        for k in current
    }
    set_peft_model_state_dict(model, tensors)


_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@contextmanager
def frozen_residual(model: PeftModel, residual: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Add fixed low-rank terms `scaling * B_res A_res x` to the LoRA layers while inside.

    `residual` has adapter-state keys (`...q_proj.lora_A.weight` / `lora_B.weight`, this model's
    layer indices): the part of the global adapter beyond this device's rank. The terms use the
    layer's own LoRA scaling, hold no gradient and leave the adapter state untouched; the hooks
    are removed on exit (models are cached across rounds).
    """
    handles = []
    try:
        for a_key in [k for k in residual if k.endswith(_A_SUFFIX)]:
            b_key = a_key[: -len(_A_SUFFIX)] + _B_SUFFIX
            if b_key not in residual:
                raise AdapterStateError(f"residual {a_key} has no matching lora_B tensor")
            name = a_key[: -len(_A_SUFFIX)]
            try:
                layer = model.get_submodule(name)
            except AttributeError as err:
                raise AdapterStateError(f"residual names {name}, not a layer of the model") from err
            scaling = getattr(layer, "scaling", None)
            if not isinstance(scaling, dict) or not scaling:
                raise AdapterStateError(f"residual names {name}, which carries no LoRA adapter")
            device = next(layer.parameters()).device
            a = torch.from_numpy(np.ascontiguousarray(residual[a_key])).to(device)
            b = torch.from_numpy(np.ascontiguousarray(residual[b_key])).to(device)
            scale = float(next(iter(scaling.values())))

            def hook(
                _m: torch.nn.Module,
                args: tuple[torch.Tensor, ...],
                out: torch.Tensor,
                a: torch.Tensor = a,
                b: torch.Tensor = b,
                scale: float = scale,
            ) -> torch.Tensor:
                x = args[0]
                return out + scale * ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)

            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


@torch.no_grad()
def merged_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapted weight replaced by W + (scale) B A: the
    merged model's weights, without a second copy of the model (only the adapted matrices are
    new tensors; the rest are the base's own)."""
    from peft.tuners.lora import Linear, LoraLayer

    base = model.get_base_model()
    state = {
        k: v for k, v in base.state_dict().items() if "lora_" not in k and ".base_layer." not in k
    }
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, Linear):  # fedpeat puts LoRA on linear projections only
            raise AdapterStateError(f"{name}: cannot merge a LoRA {type(module).__name__}")
        weight = cast(torch.Tensor, module.base_layer.weight)
        merged = weight.clone()
        for adapter in module.active_adapters:
            merged += module.get_delta_weight(adapter).to(merged.dtype)
        state[f"{name}.weight"] = merged
    # PEFT names a wrapped layer's weight `<name>.base_layer.weight`: plain names only remain.
    for name, param in base.state_dict().items():
        if ".base_layer." in name:
            state.setdefault(name.replace(".base_layer.", "."), param)
    return state
