"""Distil an emulator's middle block to the full model (Offsite-Tuning's NLD emulators).

The bottom layers are shared, so both models agree on the middle block's input; we train the
emulator's kept middle layers so that the hidden state leaving them matches the one leaving the
full model's middle block, with a normalised MSE:

    loss = mean over tokens of ||h_emulator - h_full||^2 / ||h_full||^2

Only the middle layers change; the adapter region (bottom and top) stays identical to the full
model's, which is what makes the plug-in exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fedpeat.config import DistillConfig
from fedpeat.data import Encoded
from fedpeat.emulator import Emulator, layer_prefix
from fedpeat.train import collate

log = logging.getLogger(__name__)


def normalised_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over unmasked tokens of ||s - t||^2 / ||t||^2; shapes (B, T, H), mask (B, T)."""
    err = (student - teacher).pow(2).sum(-1)
    norm = teacher.pow(2).sum(-1).clamp_min(1e-8)
    m = mask.to(err.dtype)
    return (err / norm * m).sum() / m.sum().clamp_min(1.0)


def distill(
    emulator: Emulator,
    full: torch.nn.Module,
    data: Sequence[Encoded],
    cfg: DistillConfig,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
) -> list[float]:
    """Train the emulator's middle layers in place; returns the loss per step."""
    if not data:
        raise ValueError("distillation needs server training data (data.server_train_fraction)")
    data = list(data)[: cfg.samples]
    model = emulator.model
    n_emu = len(emulator.layers)
    n_mid = n_emu - emulator.bottom - emulator.top
    layers = dict(model.named_modules())[layer_prefix(model, n_emu)]
    middle = [layers[i] for i in range(emulator.bottom, emulator.bottom + n_mid)]
    params = [p for layer in middle for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    # hidden_states[i] is the input of layer i (index 0: embeddings), so the middle block's
    # output is hidden_states[bottom + n_mid] in the emulator and [n_full - top] in the full model.
    student_at = emulator.bottom + n_mid
    teacher_at = emulator.n_full_layers - emulator.top
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    order: list[int] = []
    model.train()
    try:
        for step in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += rng.permutation(len(data)).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = collate([data[i] for i in idx], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                hidden = _base(full)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                teacher = hidden.hidden_states[teacher_at]
            out = _base(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            loss = normalised_mse(out.hidden_states[student_at], teacher, mask)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0:
                log.info(
                    "distil keep=%.2f step %d/%d loss %.4f",
                    emulator.keep_ratio,
                    step,
                    cfg.steps,
                    losses[-1],
                )
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    return losses


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder without the LM head (no vocabulary projection needed for hidden states)."""
    return getattr(model, "model", model)
