"""Quantized frozen weights: an emulator trains at 4, 8 and 16 bits on CPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpeat.emulator import build_emulator
from fedpeat.lora import attach_lora
from fedpeat.model import load_model
from fedpeat.quantization import quantize_frozen, quantized_linear_count
from fedpeat.train import evaluate_ppl, local_train

CPU = torch.device("cpu")


@pytest.mark.parametrize(("bits", "kind"), [(4, "nf4"), (8, "int8"), (16, None)])
def test_a_quantized_emulator_trains_on_cpu(tiny_cfg, tokenizer, data, bits, kind) -> None:
    full = load_model(tiny_cfg.model, cached=False)
    emulator = build_emulator(full, 0.5, 2, 2)
    # 4 and 8 bits compute in fp32 here (as on a CPU without native bf16), 16 in bf16.
    dtype = torch.bfloat16 if bits == 16 else torch.float32
    quantize_frozen(emulator.model, bits, CPU, dtype)
    counts = quantized_linear_count(emulator.model)
    if kind:
        assert counts[kind] == 7 * len(emulator.layers)
    assert emulator.model.get_input_embeddings().weight.dtype == dtype
    model = attach_lora(emulator.model, tiny_cfg.adapter, layers=emulator.adapter_layers)
    pad = tokenizer.pad_token_id
    before = evaluate_ppl(model, data, 4, pad, CPU)
    train = replace(tiny_cfg.train, local_steps=8, lr=1e-2)
    result = local_train(model, data, train, 0, pad, CPU)
    after = evaluate_ppl(model, data, 4, pad, CPU)
    assert np.isfinite(result.train_loss)
    assert after.loss < before.loss - 0.1, (before.loss, after.loss)
