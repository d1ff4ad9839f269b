"""The server's model: the merged export and the adapter's modules under the planner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeat.config import compose
from fedpeat.lora import set_adapter_state
from fedpeat.model import load_model
from fedpeat.server_model import ServerModel, initial_adapter_state


def _planner_cfg(*extra: str):
    return compose(["experiment=tiny", "planner=fedpipe", *extra])


def test_merged_export_equals_base_plus_adapter(tmp_path, tiny_cfg) -> None:
    from transformers import AutoModelForCausalLM

    server = ServerModel(_planner_cfg())
    rng = np.random.default_rng(3)
    state = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in initial_adapter_state(server.initial_state, 1).items()
    }
    server.save_merged(state, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = load_model(server.cfg.model)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    set_adapter_state(server.model, state)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = server.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fixed_modules_replace_the_importance_choice(tiny_cfg) -> None:
    modules = ["layers.0.self_attn.q_proj", "layers.7.mlp.down_proj"]
    server = ServerModel(_planner_cfg(f"adapter.modules=[{','.join(modules)}]"))
    assert server.adapter_cfg.modules == modules and server.importance["choice"].startswith("fixed")
    assert all(
        ".layers.0.self_attn.q_proj." in k or ".layers.7.mlp.down_proj." in k
        for k in server.initial_state
    )
    with pytest.raises(ValueError, match="adapter.modules"):
        ServerModel(_planner_cfg("adapter.modules=[layers.3.self_attn.q_proj]"))  # not in region
