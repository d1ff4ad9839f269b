"""Module importance on the tiny model, and the module knapsack by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeat.importance import (
    candidate_modules,
    choose_modules,
    importance_scores,
    lora_params,
    top_share,
)
from fedpeat.model import load_model

CPU = torch.device("cpu")


def test_module_choice_is_an_exact_knapsack() -> None:
    scores = {"a": 6.0, "b": 4.0, "c": 4.0}
    costs = {"a": 3, "b": 2, "c": 2}
    # Budget 4: b + c = 8 beats a = 6 (greedy by score, or by score per cost on ties, takes a).
    assert choose_modules(scores, costs, 4) == ["b", "c"]
    assert choose_modules(scores, costs, 3) == ["a"]
    assert choose_modules(scores, costs, 7) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="planner.budget_fraction"):
        choose_modules(scores, costs, 1)


def test_lora_params_and_top_share_by_hand() -> None:
    assert lora_params({"x": (4, 6), "y": (2, 2)}, ["x", "y"], 2) == 2 * 10 + 2 * 4
    scores = {"m1": 1.0, "m2": 3.0, "m3": 2.0}
    assert top_share(scores, ["m1", "m2", "m3"], 0.5) == ["m2", "m3"]  # ceil(1.5) = 2
    assert top_share(scores, ["m1", "m2", "m3"], 0.1) == ["m2"]
    assert top_share(scores, ["m1", "m2", "m3"], 1.0) == ["m1", "m2", "m3"]


def test_importance_is_the_mean_of_abs_weight_times_gradient(tiny_cfg, tokenizer, data) -> None:
    model = load_model(tiny_cfg.model, cached=False)
    modules = candidate_modules(model, ["q_proj", "down_proj"], [0, 7])
    assert sorted(modules) == [
        "layers.0.mlp.down_proj",
        "layers.0.self_attn.q_proj",
        "layers.7.mlp.down_proj",
        "layers.7.self_attn.q_proj",
    ]
    pad = tokenizer.pad_token_id
    scores = importance_scores(model, modules, data, 2, 2, pad, CPU)
    # By hand: two batches of two samples, sum |W * dL/dW| per batch, then the mean.
    from fedpeat.train import collate

    w = modules["layers.7.self_attn.q_proj"].weight
    w.requires_grad_(True)
    totals = []
    for chunk in (data[:2], data[2:]):
        model.zero_grad()
        model(**collate(chunk, pad)).loss.backward()
        totals.append(float((w.detach() * w.grad).abs().sum()))
    w.requires_grad_(False)
    assert scores["layers.7.self_attn.q_proj"] == pytest.approx(np.mean(totals), rel=1e-5)
    assert all(not p.requires_grad for p in model.parameters())  # left frozen


def test_importance_recomputes_activations_on_a_checkpointing_model(
    tiny_cfg, tokenizer, data
) -> None:
    # transformers checkpoints a layer only in training mode; the calibration runs in eval mode
    # (no dropout), so without care a checkpointing model would keep every activation.
    from fedpeat.model import sharing_twin

    full = load_model(tiny_cfg.model, cached=False)
    twin = sharing_twin(full)
    twin.gradient_checkpointing_enable({"use_reentrant": False})
    projections = ["q_proj", "down_proj"]
    args = (data, 4, 2, tokenizer.pad_token_id, CPU, 8)

    def saved_and_scores(model: torch.nn.Module) -> tuple[int, dict[str, float]]:
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = importance_scores(model, candidate_modules(model, projections, None), *args)
        return count[0], scores

    plain_saved, plain = saved_and_scores(full)
    ckpt_saved, ckpt = saved_and_scores(twin)
    assert ckpt == plain  # the same scores, bit for bit
    # The recomputation saves its tensors during the backward too, yet fewer than all kept.
    assert ckpt_saved < plain_saved, (ckpt_saved, plain_saved)
    assert not twin.training and not any(m.training for m in twin.modules())  # restored
