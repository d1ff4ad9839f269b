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


def _dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized linear layer's weight as the fp32 matrix its forward pass multiplies by."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            out[name] = w.float()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # LLM.int8 row-wise absmax: W = CB * SCB / 127
            cb, scb = module.weight.CB, module.weight.SCB
            out[name] = cb.float() * scb.float()[:, None] / 127.0
    return out


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(3, 16), (1, 5)])
def test_gradients_through_quantized_layers_match_their_dequantized_weights(
    tiny_cfg, bits, shape
) -> None:
    """The LoRA gradients (bottom and top adapter layers) through NF4 / int8 frozen layers on CPU
    equal those through the same weights de-quantized to fp32, to 1e-4 relative: the CPU
    kernels' backward is right (bitsandbytes warns that `gemv_4bit` has no autograd kernel; it
    only serves inputs that need no gradient). The same check against the original fp32 weights
    must fail, or the comparison would prove nothing."""
    import copy

    full = load_model(tiny_cfg.model, cached=False)
    emulator = build_emulator(full, 0.4, 1, 1)
    quantized = quantize_frozen(copy.deepcopy(emulator.model), bits, CPU, torch.float32)
    reference, original = copy.deepcopy(emulator.model), copy.deepcopy(emulator.model)
    modules = dict(reference.named_modules())
    weights = _dequantized(quantized)
    assert len(weights) == 7 * len(emulator.layers)
    for name, w in weights.items():
        modules[name].weight.data.copy_(w)
    models = [
        attach_lora(m, tiny_cfg.adapter, layers=emulator.adapter_layers)
        for m in (quantized, reference, original)
    ]
    # The same non-zero adapter in all three (a zero B would leave A without gradient).
    gen = torch.Generator().manual_seed(1)
    named = [dict(m.named_parameters()) for m in models]
    for name, p in named[0].items():
        if p.requires_grad:
            value = torch.randn(p.shape, generator=gen) * 0.05
            for params in named:
                params[name].data.copy_(value)
    ids = torch.randint(0, 500, shape, generator=gen)
    got, want, unquantized = (_lora_grads(m, ids) for m in models)
    bottom = [n for n in got if ".layers.0." in n]
    assert len(bottom) == 2 * len(tiny_cfg.adapter.target_modules)
    for name in got:
        scale = want[name].norm()
        assert scale > 0, name
        assert (got[name] - want[name]).norm() <= 1e-4 * scale, name
    drift = max(((got[n] - unquantized[n]).norm() / unquantized[n].norm()).item() for n in bottom)
    assert drift > 1e-3


def test_an_evaluation_leaves_the_4bit_backward_intact(
    tiny_cfg, tokenizer, data, monkeypatch
) -> None:
    # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (on AVX512-BF16 CPUs)
    # the first time the layer runs in eval mode without gradients, and that kernel has no
    # backward. Claim the CPU has it, so the repack would happen on any machine.
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    full = load_model(tiny_cfg.model, cached=False)
    quantize_frozen(full, 4, CPU, torch.float32)
    model = attach_lora(full, tiny_cfg.adapter)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so every adapter factor has a gradient
            torch.nn.init.normal_(p, std=0.1)
    pad = tokenizer.pad_token_id
    batch = data[:4]

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.train()
        ids = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(e.input_ids) for e in batch], batch_first=True, padding_value=pad
        )
        model(input_ids=ids, labels=ids.masked_fill(ids == pad, -100)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = grads()
    evaluate_ppl(model, data, 4, pad, CPU)  # eval mode, no gradients: where the repack happened
    after = grads()
    assert before.keys() == after.keys() and len(before) == 2 * 7 * len(full.model.layers)
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, msg=name)


def test_the_int8_cast_notice_is_dropped_and_other_messages_kept(caplog) -> None:
    """bitsandbytes logs the int8 input cast on every forward pass (hundreds of lines a run)."""
    import logging

    import fedpeat  # noqa: F401  (installs the filter)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16)])

    model = Block()
    quantize_frozen(model, 8, CPU, torch.float32)
    assert quantized_linear_count(model)["int8"] == 1
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    model.eval()  # in training mode bitsandbytes takes another path on a CPU, without the notice
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model.layers[0](torch.randn(2, 16))
        logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("MatMul8bitLt" in m for m in messages), messages
    assert "another message" in messages
