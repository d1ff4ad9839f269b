"""Local training of the adapter and perplexity evaluation: where it runs, its batches, the
loop and the figures it reports (no Flower here)."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedpeat.config import TrainConfig
from fedpeat.data import Encoded


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(data: Sequence[Encoded], batch_size: int) -> Iterator[Sequence[Encoded]]:
    for start in range(0, len(data), batch_size):
        yield data[start : start + batch_size]


@dataclass
class TrainResult:
    train_loss: float
    """Mean token loss over the local steps."""
    steps: int
    examples: int
    """Samples processed (with repetition when the partition is smaller than steps x batch)."""
    tokens: int
    seconds: float
    peak_mem_mb: float


@dataclass
class EvalResult:
    loss: float
    """Mean negative log-likelihood per predicted token (nats)."""
    ppl: float
    tokens: int
    seconds: float


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: the CUDA allocator's peak, or on CPU this process's peak resident set.

    On CPU it is a process-wide high-water mark (VmHWM; ru_maxrss would include what a parent
    process had when it forked us), so it covers everything the process ever held.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def local_train(
    model: torch.nn.Module,
    data: Sequence[Encoded],
    cfg: TrainConfig,
    seed: int,
    pad_id: int,
    device: torch.device,
) -> TrainResult:
    """`cfg.local_steps` AdamW steps on batches drawn without replacement (cycling) from `data`.

    Only parameters with `requires_grad` (the adapter) are optimised; a fresh optimiser each round
    keeps devices stateless, as in FedAvg.
    """
    if not data:
        raise ValueError("no training samples on this device")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    order: list[int] = []
    losses, tokens, examples = [], 0, 0
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.local_steps):
        if len(order) < cfg.batch_size:
            order += rng.permutation(len(data)).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = {k: v.to(device) for k, v in collate([data[i] for i in idx], pad_id).items()}
        out = model(**batch)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optim.step()
        losses.append(float(out.loss.detach()))
        tokens += int((batch["labels"][:, 1:] != -100).sum())
        examples += len(idx)
    model.eval()
    return TrainResult(
        train_loss=float(np.mean(losses)),
        steps=cfg.local_steps,
        examples=examples,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(device),
    )


@torch.no_grad()
def evaluate_ppl(
    model: torch.nn.Module,
    data: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> EvalResult:
    """Token-level perplexity: exp(sum of NLL / number of predicted tokens)."""
    if not data:
        raise ValueError("no evaluation samples")
    model.eval()
    nll, count = 0.0, 0
    start = time.perf_counter()
    for chunk in batches(data, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        nll += float(
            F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        count += int((shift_labels != -100).sum())
    loss = nll / max(count, 1)
    return EvalResult(
        loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=count, seconds=time.perf_counter() - start
    )
