"""LoRA on the tiny model: state helpers, checks, and the frozen residual of a low-rank device."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpeat.config import AdapterConfig
from fedpeat.lora import (
    AdapterStateError,
    attach_lora,
    check_adapter_state,
    get_adapter_state,
    set_adapter_state,
)
from fedpeat.model import load_model


def test_lora_starts_as_a_no_op_and_state_round_trips(tiny_cfg, lora) -> None:
    state = get_adapter_state(lora)
    layers, modules = tiny_cfg.model.tiny.num_layers, len(tiny_cfg.adapter.target_modules)
    assert len(state) == 2 * layers * modules
    assert all(v.dtype == np.float32 for v in state.values())
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)
    changed = {k: v + 1.0 for k, v in state.items()}
    set_adapter_state(lora, changed)
    again = get_adapter_state(lora)
    for k in state:
        np.testing.assert_allclose(again[k], changed[k])


def test_check_adapter_state_rejects_bad_states() -> None:
    expected = {"a": (2, 3)}
    check_adapter_state(expected, {"a": np.zeros((2, 3))})
    with pytest.raises(AdapterStateError, match="1 missing"):
        check_adapter_state(expected, {})
    with pytest.raises(AdapterStateError, match="1 unexpected"):
        check_adapter_state(expected, {"a": np.zeros((2, 3)), "b": np.zeros(1)})
    with pytest.raises(AdapterStateError, match=r"shape \(3, 2\)"):
        check_adapter_state(expected, {"a": np.zeros((3, 2))})
    with pytest.raises(AdapterStateError, match="non-finite"):
        check_adapter_state(expected, {"a": np.full((2, 3), np.nan)})


def test_unknown_target_module_is_named(tiny_cfg) -> None:
    base = load_model(tiny_cfg.model, cached=False)
    with pytest.raises(AdapterStateError, match=r"\['c_attn'\] are not modules"):
        attach_lora(base, AdapterConfig(target_modules=["c_attn"]))


def test_a_frozen_residual_makes_a_low_rank_device_compute_the_global_adapter(tiny_cfg) -> None:
    from fedpeat.lora import frozen_residual
    from strategies.aggregation import residual_state, truncate_state

    # A rank-4 "global" adapter with non-zero B; a rank-2 device gets its truncation, and with
    # the residual hooked in its outputs are the global model's. Same alpha / r on both.
    scale = tiny_cfg.adapter.alpha / tiny_cfg.adapter.r
    big = attach_lora(
        load_model(tiny_cfg.model, cached=False), replace(tiny_cfg.adapter, r=4, alpha=4 * scale)
    )
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in get_adapter_state(big).items()
    }
    set_adapter_state(big, state)
    small = attach_lora(
        load_model(tiny_cfg.model, cached=False), replace(tiny_cfg.adapter, r=2, alpha=2 * scale)
    )
    set_adapter_state(small, truncate_state(state, 2))
    rest = residual_state(state, 2)
    assert rest
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = big(input_ids=ids).logits
        alone = small(input_ids=ids).logits
        with frozen_residual(small, rest):
            hooked = small(input_ids=ids).logits
        after = small(input_ids=ids).logits
    torch.testing.assert_close(hooked, want, atol=1e-4, rtol=1e-4)
    assert (alone - want).abs().max() > 1e-3  # the truncation alone is another model
    torch.testing.assert_close(after, alone)  # hooks are gone on exit
    # the residual trains nothing: gradients reach the adapter only
    with frozen_residual(small, rest):
        small(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in small.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # a residual naming a layer without LoRA is refused with its name
    with (
        pytest.raises(AdapterStateError, match="not a layer"),
        frozen_residual(
            small,
            {
                "nope.lora_A.weight": rest[next(iter(rest))],
                "nope.lora_B.weight": rest[next(iter(rest))],
            },
        ),
    ):
        pass
