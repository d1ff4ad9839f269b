"""Batching, local training and perplexity on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedpeat.data import encode
from fedpeat.train import collate, evaluate_ppl, local_train

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


def test_perplexity_matches_a_hand_computation(lora, data, tokenizer) -> None:
    res = evaluate_ppl(lora, data, 3, tokenizer.pad_token_id, CPU)
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
