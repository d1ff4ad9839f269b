"""Distillation of an emulator towards the full model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeat.emulator import build_emulator


def test_distillation_pulls_the_emulator_towards_the_full_model(tiny_cfg, full, tokenizer) -> None:
    from dataclasses import replace

    from fedpeat.data import encode, server_data, server_train_data
    from fedpeat.distill import distill, normalised_mse
    from fedpeat.train import collate

    # normalised MSE by hand: ||(1,1)-(1,0)||^2 / ||(1,0)||^2 = 1; a masked token is ignored.
    s = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(normalised_mse(s, t, torch.tensor([[1, 0]]))) == pytest.approx(1.0)

    cfg = replace(tiny_cfg.data, max_samples=600, server_train_fraction=0.4)
    train = encode(server_train_data(cfg), tokenizer, 32)
    held = collate(encode(server_data(cfg), tokenizer, 32)[:16], tokenizer.pad_token_id)
    emulator = build_emulator(full, 0.5, 2, 2)

    def gap() -> float:
        """nMSE between the middle blocks' outputs on held-out text (the distillation target);
        a random tiny model has no perplexity signal to compare."""
        with torch.no_grad():
            kw = {"attention_mask": held["attention_mask"], "output_hidden_states": True}
            h_e = emulator.model.model(held["input_ids"], **kw).hidden_states[4]
            h_f = full.model(held["input_ids"], **kw).hidden_states[6]
        return float(normalised_mse(h_e, h_f, held["attention_mask"]))

    before = gap()
    dcfg = replace(tiny_cfg.emulator.distill, enabled=True, steps=60, lr=3e-3, samples=200)
    losses = distill(emulator, full, train, dcfg, tokenizer.pad_token_id, torch.device("cpu"))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert gap() < 0.75 * before
    # The adapter region is untouched: the plug-in stays exact.
    for j, i in zip([0, 1, 4, 5], [0, 1, 6, 7], strict=True):
        torch.testing.assert_close(
            emulator.model.model.layers[j].self_attn.q_proj.weight,
            full.model.layers[i].self_attn.q_proj.weight.half().float(),
        )
