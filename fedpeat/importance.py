"""Which weight matrices carry LoRA: first-order importance and a choice under a parameter budget.

The importance of a frozen matrix W is the mean over calibration batches of sum |W * dL/dW|: the
first-order estimate of how much the loss moves when W moves along its gradient (FedPipe). The
choice maximises the summed importance of the chosen matrices whose LoRA parameters at rank R,
R (in + out) each, fit the budget: a 0/1 knapsack, solved exactly with `milp`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from fedpeat.data import Encoded
from fedpeat.train import batches, collate, token_nll

_NAME = re.compile(r"(?:^|\.)(layers\.(\d+)\..*)$")


def candidate_modules(
    model: torch.nn.Module, projections: Sequence[str], layers: Sequence[int] | None
) -> dict[str, torch.nn.Linear]:
    """`layers.<i>.<path>` -> linear module, for each projection in `layers` (None: all)."""
    wanted = set(layers) if layers is not None else None
    out: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        m = _NAME.search(name)
        if not (m and isinstance(module, torch.nn.Linear)):
            continue
        if name.rsplit(".", 1)[-1] in projections and (wanted is None or int(m.group(2)) in wanted):
            out[m.group(1)] = module
    return out


def importance_scores(
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Linear],
    data: Sequence[Encoded],
    batch_size: int,
    n_batches: int,
    pad_id: int,
    device: torch.device,
    loss_chunk: int = 0,
) -> dict[str, float]:
    """Mean over `n_batches` batches of sum |W * dL/dW| for each module's weight (the loss
    computed as in training, `loss_chunk` positions of logits at a time)."""
    if not data:
        raise ValueError("importance needs calibration data: the server's training set is empty")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: mod.weight for name, mod in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
    totals = dict.fromkeys(weights, 0.0)
    seen = dict.fromkeys(weights, 0)

    def score(name: str) -> Callable[[torch.Tensor], None]:
        def hook(w: torch.Tensor) -> None:
            assert w.grad is not None
            totals[name] += float((w.detach() * w.grad).abs().sum())
            seen[name] += 1
            w.grad = None  # scored as soon as it exists: every candidate's at once would cost
            # as much memory again as the candidates' weights (all layers', `adapt=held`)

        return hook

    hooks = [w.register_post_accumulate_grad_hook(score(n)) for n, w in weights.items()]
    used = 0
    was_training = model.training
    model.eval()  # no dropout: the score of the deployed weights
    for module in model.modules():  # transformers recomputes a checkpointing layer's
        if getattr(module, "gradient_checkpointing", False):  # activations in training mode
            module.training = True  # only: the layer alone, its dropouts stay off
    try:
        for chunk in list(batches(list(data), batch_size))[:n_batches]:
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            model.zero_grad(set_to_none=True)
            scored = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
            (token_nll(model, batch, loss_chunk).sum() / scored).backward()
            used += 1
            missed = [n for n, k in seen.items() if k != used]
            if missed:  # a candidate the loss does not reach would score 0 silently
                raise RuntimeError(f"importance: no gradient reached {missed[:3]}")
    finally:
        for handle in hooks:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / max(used, 1) for name, total in totals.items()}


def choose_modules(
    scores: Mapping[str, float], costs: Mapping[str, int], budget: float
) -> list[str]:
    """The subset with the largest summed score whose summed cost fits `budget` (0/1 knapsack).

    Returned in the order of `scores`. Raises ValueError if not even the cheapest module fits.
    """
    names = list(scores)
    if not names:
        return []
    cost = np.array([costs[n] for n in names], dtype=float)
    if cost.min() > budget:
        raise ValueError(
            f"adapter budget {budget:.0f} parameters is below the cheapest module "
            f"({names[int(cost.argmin())]}: {cost.min():.0f}); raise planner.budget_fraction"
        )
    value = np.array([scores[n] for n in names], dtype=float)
    res = milp(
        -value,
        constraints=[LinearConstraint(cost[None, :], -np.inf, budget)],
        integrality=np.ones(len(names)),
        bounds=Bounds(0.0, 1.0),
    )
    if res.x is None:
        raise RuntimeError(f"module choice failed: {res.message}")
    return [n for n, x in zip(names, res.x, strict=True) if x > 0.5]


def lora_params(shapes: Mapping[str, tuple[int, int]], modules: Sequence[str], rank: int) -> int:
    """LoRA parameters of `modules` at `rank`: rank * (in + out) each; shapes are (out, in)."""
    return sum(rank * (shapes[m][0] + shapes[m][1]) for m in modules)


def top_share(scores: Mapping[str, float], modules: Sequence[str], share: float) -> list[str]:
    """The most important `share` of `modules` (rounded up, at least one), in their order."""
    k = max(1, math.ceil(share * len(modules) - 1e-9))
    keep = set(sorted(modules, key=lambda m: -scores.get(m, 0.0))[:k])
    return [m for m in modules if m in keep]


@torch.no_grad()
def block_influence(
    model: torch.nn.Module,
    data: Sequence[Encoded],
    batch_size: int,
    n_batches: int,
    pad_id: int,
    device: torch.device,
) -> list[float]:
    """Block influence of each decoder layer (ShortGPT, Men et al. 2024): the mean over real
    tokens of 1 - cos(h_in, h_out), the layer's input and output hidden states. A layer that
    barely turns the residual stream can be dropped with the least damage."""
    if not data:
        raise ValueError("block influence needs calibration data")
    model.eval()
    totals: np.ndarray | None = None
    count = 0.0
    for i, chunk in enumerate(batches(data, batch_size)):
        if i >= n_batches:
            break
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        base = getattr(model, "model", model)
        hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.to(torch.float32)
        values = []
        for h_in, h_out in itertools.pairwise(hidden):
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            values.append(float(((1.0 - cos) * m).sum()))
        # The last entry of hidden_states is after the final norm in HF Llama: the last layer's
        # raw output is not exposed, so its influence is measured against the normed state.
        totals = np.asarray(values) if totals is None else totals + np.asarray(values)
        count += float(m.sum())
    assert totals is not None
    return (totals / max(count, 1.0)).tolist()
