"""Local training of the adapter and perplexity evaluation: where it runs, its batches, the
loop and the figures it reports (no Flower here)."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
    gpu: int = -1
    """The CUDA device index it trained on, as this process numbers them (-1: the CPU)."""


@dataclass
class EvalResult:
    loss: float
    """Mean negative log-likelihood per predicted token (nats)."""
    ppl: float
    tokens: int
    seconds: float
    sample_nll: list[float] = field(default_factory=list)
    """Summed NLL of each sample (the bootstrap resamples samples)."""
    sample_tokens: list[int] = field(default_factory=list)

    def ppl_of(self, idx: Sequence[int] | np.ndarray) -> float:
        """Perplexity over the samples `idx` (with repeats: a bootstrap resample)."""
        nll = sum(self.sample_nll[i] for i in idx)
        count = sum(self.sample_tokens[i] for i in idx)
        return math.exp(min(nll / max(count, 1), 50.0))


def gpu_index(device: torch.device) -> int:
    """`device`'s CUDA index (the current one for a bare `cuda`), -1 for any other device."""
    if device.type != "cuda":
        return -1
    return int(device.index if device.index is not None else torch.cuda.current_device())


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


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, LM head) of a causal LM, PEFT-wrapped or not, whose logits are the head applied
    to the decoder's last hidden state; None where the model does more (soft-capping, a logit
    scale) or does not split so: the model's own forward computes its logits then."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return None
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        return None
    decoder = getattr(lm, "base_model", None)  # transformers: the decoder under the head
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or decoder is lm or head is None:
        return None
    return decoder, head


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


class _FrozenHeadNLL(torch.autograd.Function):
    """Per-token NLL through a frozen linear head, `chunk` rows of logits at a time, with the
    gradient for the hidden states worked out in the same pass: d nll_i / d h_i =
    (softmax(l_i) - onehot(y_i)) W. The backward only scales it by the incoming gradient, so
    no logits are kept or recomputed (what checkpointing each chunk would cost)."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, len(targets), chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(y), device=y.device)
            nll[start : start + chunk] = lse - logits[rows, y]
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[rows, y] -= 1.0
            grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None


def _head_nll(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """NLL of `targets` under `head(hidden)`, `chunk` positions of logits at a time: in one pass
    where the head is a frozen bias-free linear map (the usual tied or untied LM head), else
    each chunk checkpointed (recomputed for the backward)."""
    weight = getattr(head, "weight", None)
    frozen = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    if frozen and torch.is_grad_enabled() and hidden.requires_grad:
        return cast(torch.Tensor, _FrozenHeadNLL.apply(hidden, weight, targets, chunk))
    pieces = []
    for start in range(0, len(targets), chunk):
        hs, ys = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(partial(_chunk_nll, head), hs, ys, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(head, hs, ys))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def token_nll(model: Any, batch: dict[str, torch.Tensor], chunk: int = 0) -> torch.Tensor:
    """Next-token NLL (nats) at every position, (batch, length - 1), 0 where `labels[:, 1:]` is
    -100. With `chunk` > 0 the LM head runs over the scored positions only, `chunk` at a time,
    each chunk recomputed in the backward (activation checkpointing): the (batch, length,
    vocabulary) fp32 logits, their log-softmax and gradients never exist, only one chunk's."""
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    parts = _decoder_and_head(model) if chunk > 0 else None
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        return (
            F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none"
            ).view(labels.shape)
            * scored
        )
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if bool(scored.any()):
        nll = nll.masked_scatter(
            scored, _head_nll(head, hidden[:, :-1][scored], labels[scored], chunk)
        )
    return nll


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
        scored = int((batch["labels"][:, 1:] != -100).sum())
        loss = token_nll(model, batch, cfg.loss_chunk).sum() / max(scored, 1)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optim.step()
        losses.append(float(loss.detach()))
        tokens += scored
        examples += len(idx)
    model.eval()
    return TrainResult(
        train_loss=float(np.mean(losses)),
        steps=cfg.local_steps,
        examples=examples,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(device),
        gpu=gpu_index(device),
    )


@torch.no_grad()
def evaluate_ppl(
    model: torch.nn.Module,
    data: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    loss_chunk: int = 0,
) -> EvalResult:
    """Token-level perplexity: exp(sum of NLL / number of predicted tokens); `loss_chunk` as
    in `token_nll`."""
    if not data:
        raise ValueError("no evaluation samples")
    model.eval()
    sample_nll: list[float] = []
    sample_tokens: list[int] = []
    start = time.perf_counter()
    for chunk in batches(data, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        sample_nll += token_nll(model, batch, loss_chunk).sum(1).tolist()
        sample_tokens += (batch["labels"][:, 1:] != -100).sum(1).tolist()
    count = sum(sample_tokens)
    loss = sum(sample_nll) / max(count, 1)
    return EvalResult(
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),
        tokens=count,
        seconds=time.perf_counter() - start,
        sample_nll=sample_nll,
        sample_tokens=sample_tokens,
    )


@torch.no_grad()
def generate_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuations (new tokens only, up to the first EOS) of tokenized prompts.

    Prompts are left-padded so every row's last prompt token sits at the same position; the KV
    cache makes each new token one forward step of the batch.
    """
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in gen[:, width:].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            out.append(row)
    return out
