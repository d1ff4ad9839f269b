"""Distil an emulator's middle block to the full model (Offsite-Tuning's NLD emulators).

The bottom layers are shared, so both models agree on the middle block's input; we train the
emulator's kept middle layers to reproduce the full model. `emulator.distill.loss` sums any of:

- `hidden`: the hidden state leaving the middle block matches the full model's, normalised MSE
      mean over tokens of ||h_emulator - h_full||^2 / ||h_full||^2  (Offsite-Tuning);
- `layerwise`: the same at every kept middle layer, whose target is the full model's state
  where the next kept layer starts (each kept layer learns to also do the dropped ones' work);
- `kd`: the KL divergence of the emulator's next-token distribution from the full model's
  (knowledge distillation on the output, what the adapter's gradient actually flows through).

Only the middle layers change; the adapter region (bottom and top) stays identical to the full
model's, which is what makes the plug-in exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedpeat.config import AlignConfig, DistillConfig
from fedpeat.data import Encoded, Sample
from fedpeat.emulator import Emulator, layer_prefix, middle_parameters, package
from fedpeat.emulator_cache import load_cached, save_cached
from fedpeat.train import batches, collate

log = logging.getLogger(__name__)


def normalised_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over unmasked tokens of ||s - t||^2 / ||t||^2; shapes (B, T, H), mask (B, T)."""
    err = (student - teacher).pow(2).sum(-1)
    norm = teacher.pow(2).sum(-1).clamp_min(1e-8)
    m = mask.to(err.dtype)
    return (err / norm * m).sum() / m.sum().clamp_min(1.0)


def token_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over unmasked tokens of KL(teacher || student) of the next-token distributions."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def targets(emulator: Emulator, loss: str) -> list[tuple[int, int]]:
    """(emulator hidden-state index, full-model hidden-state index) pairs to match.

    hidden_states[i] is the input of layer i; the middle block's output is the input of the
    first top layer. `layerwise`: after each kept middle layer, the input of the next kept layer.
    """
    layers, b = emulator.layers, emulator.bottom
    n_mid = len(layers) - b - emulator.top
    last = (b + n_mid, emulator.n_full_layers - emulator.top)
    if "layerwise" in loss:
        return [(j + 1, layers[j + 1]) for j in range(b, b + n_mid - 1)] + [last]
    return [last] if "hidden" in loss else []


@dataclass
class _Batch:
    """One distillation batch as the teacher saw it: the middle block's input (the bottom
    region's output, the same in both models), the targets, the padding mask."""

    inputs: torch.Tensor
    targets: list[torch.Tensor]
    mask: torch.Tensor


@torch.no_grad()
def _teacher_batches(
    emulator: Emulator,
    full: torch.nn.Module,
    data: Sequence[Encoded],
    pairs: Sequence[tuple[int, int]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> list[_Batch]:
    """One pass of the full model over the distillation data; what every step needs is kept,
    so a step runs only the emulator's middle block (and, for `kd`, the top region and head)."""
    # Each target needs the full model's state where the student's output is compared; `kd`
    # needs the middle block's output (the top region and head then give the logits).
    wanted = [t for _, t in pairs] or [emulator.n_full_layers - emulator.top]
    out = []
    for chunk in batches(data, batch_size):
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = _base(full)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = hidden.hidden_states
        out.append(_Batch(states[emulator.bottom], [states[t] for t in wanted], mask))
    return out


def _run_layers(
    model: torch.nn.Module, layers: Sequence[torch.nn.Module], h: torch.Tensor, mask: torch.Tensor
) -> list[torch.Tensor]:
    """Run decoder `layers` of `model` on hidden states `h` (positions from 0, causal with the
    padding `mask`); the output of every layer, in order."""
    from transformers.masking_utils import create_causal_mask

    base: Any = _base(model)  # a Llama-style decoder: config, rotary_emb, layers
    pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    causal = create_causal_mask(
        config=base.config,
        inputs_embeds=h,
        attention_mask=mask,
        past_key_values=None,
        position_ids=pos,
    )
    rope = base.rotary_emb(h, position_ids=pos)
    outs = []
    for layer in layers:
        h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
        outs.append(h)
    return outs


def _logits(
    model: torch.nn.Module, top: Sequence[torch.nn.Module], h: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The top region, the final norm and the LM head on the middle block's output."""
    h = _run_layers(model, top, h, mask)[-1] if top else h
    return model.lm_head(_base(model).norm(h))  # type: ignore[operator]


def distill(
    emulator: Emulator,
    full: torch.nn.Module,
    data: Sequence[Encoded],
    cfg: DistillConfig,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
) -> list[float]:
    """Train the emulator's middle layers in place; returns the loss per step.

    The full model runs once over the data (`_teacher_batches`); each step then runs only the
    emulator's middle layers on the cached middle-block inputs (for `kd` also the frozen top
    region and head), a fraction of a whole forward and backward pass of both models.
    """
    if not data:
        raise ValueError("distillation needs server training data (data.server_train_fraction)")
    data = list(data)[: cfg.samples]
    model = emulator.model
    n_emu = len(emulator.layers)
    n_mid = n_emu - emulator.bottom - emulator.top
    layers = dict(model.named_modules())[layer_prefix(model, n_emu)]
    middle = [layers[i] for i in range(emulator.bottom, emulator.bottom + n_mid)]
    top = [layers[i] for i in range(emulator.bottom + n_mid, n_emu)]
    params = [p for layer in middle for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    pairs = targets(emulator, cfg.loss)
    use_kd = "kd" in cfg.loss
    cached = _teacher_batches(emulator, full, data, pairs, cfg.batch_size, pad_id, device)
    # Student index s_at is the input of emulator layer s_at: the output of middle layer
    # s_at - bottom - 1.
    picks = [s_at - emulator.bottom - 1 for s_at, _ in pairs]
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    order: list[int] = []
    model.train()
    try:
        for step in range(cfg.steps):
            if not order:
                order = rng.permutation(len(cached)).tolist()
            b = cached[order.pop()]
            outs = _run_layers(model, middle, b.inputs, b.mask)
            loss = torch.zeros((), device=device)
            for pick, target in zip(picks, b.targets, strict=False):
                loss = loss + normalised_mse(outs[pick], target, b.mask) / len(picks)
            if use_kd:
                with torch.no_grad():
                    teacher = _logits(model, top, b.targets[-1], b.mask)
                loss = loss + token_kl(_logits(model, top, outs[-1], b.mask), teacher, b.mask)
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


def distilled_in_place(
    emulator: Emulator,
    full: torch.nn.Module,
    data: Sequence[Encoded],
    cfg: DistillConfig,
    pad_id: int,
    device: torch.device,
    wire: torch.dtype,
    path: Path,
    key: str,
) -> None:
    """Give `emulator` its distilled middle layers: from the cache file at `path` when it was
    written for `key` (the derivation: model, layers, recipe, data), else by distilling them
    here (`distill`), rounded through the wire dtype as a device holds them, and cached. Only
    the middle layers change; a view's shared tensors (the full model's) stay untouched."""
    middle = middle_parameters(emulator)
    cached = load_cached(path, key, keep=set(middle))  # the rest is the full model's own
    if cached is not None and set(middle) <= set(cached.state):
        log.info("emulator keep=%.2f: distilled copy from the cache", emulator.keep_ratio)
        with torch.no_grad():
            for k, p in middle.items():  # each cached tensor freed once copied
                p.copy_(torch.from_numpy(cached.state.pop(k)).to(p.dtype))
    else:
        distill(emulator, full, data, cfg, pad_id, device)
        with torch.no_grad():
            for p in middle.values():
                p.copy_(p.to(wire).to(p.dtype))
        save_cached(package(emulator, wire), path, key)
    emulator.distilled = True


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder without the LM head (no vocabulary projection needed for hidden states)."""
    return getattr(model, "model", model)


# --------------------------------------------------------------------------- knowledge back


def align_inputs(
    samples: Sequence[Sample], tokenizer: Any, max_length: int, limit: int
) -> list[Encoded]:
    """The server's inputs for knowledge back, at most `limit`: each distinct prompt alone
    (every label -100: the teacher answers it), or a text sample as `encode` makes it."""
    from fedpeat.data import encode

    out: list[Encoded] = []
    seen: set[str] = set()
    for s in samples:
        if len(out) >= limit:
            break
        if not s.get("prompt"):
            out.extend(encode([s], tokenizer, max_length))
        elif s["prompt"] not in seen:
            seen.add(s["prompt"])
            ids = tokenizer(s["prompt"], add_special_tokens=False)["input_ids"][:max_length]
            out.append(Encoded(ids, [-100] * len(ids)))
    return out


@torch.no_grad()
def teacher_data(
    teacher: torch.nn.Module,
    inputs: Sequence[Encoded],
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
) -> list[Encoded]:
    """What the plug-in imitates the emulator on. A prompt (`labels` -100 on every position of
    the input) is completed by the teacher's greedy answer and the answer is compared; text
    without a prompt is compared where it has labels. The inputs' own labels never become
    targets: the teacher's distributions are the targets."""
    from fedpeat.train import generate_greedy

    prompts = [e.input_ids for e in inputs if all(x == -100 for x in e.labels)]
    text = [e for e in inputs if not all(x == -100 for x in e.labels)]
    answers = generate_greedy(teacher, prompts, max_new_tokens, batch_size, pad_id, eos_id, device)
    eos = [eos_id] if eos_id is not None else []
    out = list(text)
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = (prompt + answer + eos)[:max_length]
        labels = ([-100] * len(prompt) + answer + eos)[:max_length]
        if any(x != -100 for x in labels[1:]):
            out.append(Encoded(ids, labels))
    return out


def align(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    inputs: Sequence[Encoded],
    cfg: AlignConfig,
    max_length: int,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
    seed: int = 0,
) -> tuple[list[float], int]:
    """Knowledge back on `inputs` (`align_inputs`): the teacher answers, the student imitates;
    the loss per step and the number of sequences it learned from."""
    data = teacher_data(
        teacher, inputs, cfg.max_new_tokens, max_length, cfg.batch_size, pad_id, eos_id, device
    )
    losses = knowledge_back(
        teacher, student, data, cfg.steps, cfg.lr, cfg.batch_size, pad_id, device, seed
    )
    return losses, len(data)


def knowledge_back(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    data: Sequence[Encoded],
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
) -> list[float]:
    """`steps` AdamW steps of the student's trainable parameters (the plug-in's adapter) on
    KL(teacher || student) over the positions `data` labels; returns the loss per step.

    No dropout (both run in eval mode; gradients still flow), so the targets and the student's
    outputs are deterministic, and no weight decay: only the KL moves the adapter."""
    if not data:
        raise ValueError("knowledge back needs server inputs (data.server_train_fraction)")
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    teacher.eval()
    student.eval()
    for _ in range(steps):
        chunk = []
        for _ in range(min(batch_size, len(data))):
            if not order:
                order = rng.permutation(len(data)).tolist()
            chunk.append(data[order.pop()])
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        scored = (batch["labels"][:, 1:] != -100).to(device)
        with torch.no_grad():
            target = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = token_kl(logits, target, scored)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(float(loss.detach()))
    return losses
