"""Batching, local training and perplexity on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedpeat.data import encode
from fedpeat.train import (
    _decoder_and_head,
    collate,
    evaluate_ppl,
    gpu_index,
    local_train,
    token_nll,
)

CPU = torch.device("cpu")


def test_collate_pads_right_with_ignored_labels(tokenizer) -> None:
    data = encode(
        [{"prompt": "", "response": "a b c d"}, {"prompt": "", "response": "a"}], tokenizer, 32
    )
    batch = collate(data, pad_id=0)
    n0, n1 = len(data[0].input_ids), len(data[1].input_ids)
    assert batch["input_ids"].shape == (2, n0)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert batch["labels"][1, n1:].tolist() == [-100] * (n0 - n1)


def test_gpu_index_names_the_cuda_device_or_minus_one() -> None:
    assert gpu_index(torch.device("cpu")) == -1
    assert gpu_index(torch.device("meta")) == -1
    assert gpu_index(torch.device("cuda", 3)) == 3  # an explicit index, no CUDA call needed


def test_local_training_lowers_the_loss_and_touches_only_the_adapter(
    tiny_cfg, lora, data, tokenizer
) -> None:
    base_before = {k: v.clone() for k, v in lora.named_parameters() if "lora_" not in k}
    before = evaluate_ppl(lora, data, 4, tokenizer.pad_token_id, CPU)
    result = local_train(
        lora, data, replace(tiny_cfg.train, local_steps=8, lr=1e-2), 0, tokenizer.pad_token_id, CPU
    )
    after = evaluate_ppl(lora, data, 4, tokenizer.pad_token_id, CPU)
    assert after.loss < before.loss - 0.1
    assert (
        result.steps == 8 and result.examples == 32 and result.tokens > 0 and result.peak_mem_mb > 0
    )
    for k, v in lora.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k


@pytest.mark.parametrize("chunk", [0, 3])
def test_perplexity_matches_a_hand_computation(lora, data, tokenizer, chunk) -> None:
    res = evaluate_ppl(lora, data, 3, tokenizer.pad_token_id, CPU, chunk)
    batch = collate(data, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert res.tokens == int(mask.sum())
    assert res.loss == pytest.approx(float(nll.mean()), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def _mixed_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Rows of different lengths (padding) and a prompt whose positions are not scored."""
    data = encode(
        [
            {"prompt": "name[Aromi] food[Chinese]", "response": "Aromi serves Chinese food."},
            {"prompt": "", "response": "ROMEO:\nBut soft, what light"},
            {"prompt": "", "response": "a"},
        ],
        tokenizer,
        32,
    )
    return collate(data, tokenizer.pad_token_id)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradient(lora, tokenizer, chunk) -> None:
    batch = _mixed_batch(tokenizer)
    scored = batch["labels"][:, 1:] != -100
    assert 0 < int(scored.sum()) < scored.numel()  # padding and prompt positions exist

    def loss_and_grads(c: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        lora.zero_grad(set_to_none=True)
        nll = token_nll(lora, batch, c)
        loss = nll.sum() / scored.sum()
        loss.backward()
        grads = [p.grad.clone() for p in lora.parameters() if p.requires_grad]
        return nll.detach(), loss.detach(), grads

    full_nll, full_loss, full_grads = loss_and_grads(0)
    nll, loss, grads = loss_and_grads(chunk)
    # The model's own loss (mean over scored tokens) is the reference for both.
    out = lora(**batch)
    assert float(full_loss) == pytest.approx(float(out.loss.detach()), rel=1e-5)
    assert torch.allclose(nll, full_nll, atol=1e-5)
    assert bool((nll[~scored] == 0).all())
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-5)
    assert all(
        torch.allclose(g, f, atol=1e-6, rtol=1e-4) for g, f in zip(grads, full_grads, strict=True)
    )
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_chunked_loss_keeps_no_vocabulary_wide_tensor_for_the_backward(lora, tokenizer) -> None:
    """What autograd saves for the backward: with full logits, (tokens x vocabulary) tensors;
    chunked, nothing vocabulary-wide beyond the frozen head's weight."""
    batch = _mixed_batch(tokenizer)
    vocab = lora.get_base_model().get_output_embeddings().weight.shape[0]
    rows = int(batch["input_ids"].numel())

    def largest_saved(chunk: int) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 1 and t.shape[-1] == vocab:
                sizes.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_nll(lora, batch, chunk).sum().backward()
        return max(sizes, default=0)

    assert largest_saved(0) >= rows - len(batch["input_ids"])  # logits of every position
    assert largest_saved(4) == 0


def test_a_trainable_head_takes_the_checkpointed_chunks(lora, tokenizer) -> None:
    """Where the head itself trains, the one-pass gradient (hidden states only) cannot serve:
    each chunk is checkpointed instead, and the head's gradient equals the full loss's."""
    batch = _mixed_batch(tokenizer)
    head = lora.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)
    try:
        grads = []
        for chunk in (0, 3):
            lora.zero_grad(set_to_none=True)
            token_nll(lora, batch, chunk).sum().backward()
            grads.append(head.weight.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)
        assert float(grads[0].abs().sum()) > 0
    finally:
        head.weight.requires_grad_(False)
        head.weight.grad = None


def test_models_that_transform_their_logits_keep_their_own_forward(lora) -> None:
    assert _decoder_and_head(lora) is not None
    lora.get_base_model().config.final_logit_softcapping = 30.0
    try:
        assert _decoder_and_head(lora) is None
    finally:
        lora.get_base_model().config.final_logit_softcapping = None
