"""Full fine-tuning (the `fed_ft` baseline): every weight of the full model trains and travels.

The "adapter state" of a fed_ft run is the whole model's parameter dict, so the strategy's
validation, byte counting and averaging apply unchanged, and the bytes on the wire are the real
ones: the full model down and up, every device, every round.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch
from transformers import PreTrainedModel

from fedpeat.config import ModelConfig
from fedpeat.model import load_model

_FULL: dict[str, PreTrainedModel] = {}


def trainable_full_model(cfg: ModelConfig, device: torch.device | str) -> PreTrainedModel:
    """A trainable copy of the full model, cached per process (its weights are overwritten with
    `set_full_state` before every use, so a cached copy never leaks one device's update)."""
    key = json.dumps([asdict(cfg), str(device)], sort_keys=True)
    if key not in _FULL:
        model = load_model(cfg, device, cached=False)
        for param in model.parameters():
            param.requires_grad_(True)
        _FULL[key] = model
    return _FULL[key]


def full_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter once (tied embeddings once), as float32 numpy arrays."""
    return {
        name: p.detach().to("cpu", torch.float32).numpy().copy()
        for name, p in model.named_parameters()
    }


def set_full_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load `state` (from `full_state`) into `model`; every parameter must be present."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"full state: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(state[name]).to(p.device, p.dtype))
