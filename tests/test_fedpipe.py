"""FedPipe on real (tiny) models: quantized training on CPU, importance scores, the merged
export, and a planned federated run with heterogeneous devices."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from fedpeat.data import encode
from fedpeat.emulator import adapter_region, build_emulator, to_emulator_modules
from fedpeat.importance import candidate_modules, importance_scores
from fedpeat.lora import attach_lora, set_adapter_state
from fedpeat.model import load_model
from fedpeat.outputs import read_metrics
from fedpeat.quantization import quantize_frozen, quantized_linear_count
from fedpeat.task import ServerModel, initial_adapter_state
from fedpeat.train import evaluate_ppl, local_train
from server_app.app import _run

CPU = torch.device("cpu")


@pytest.fixture()
def data(tokenizer):
    texts = ["ROMEO:\nBut soft, what light through yonder window breaks?"] * 4
    return encode([{"prompt": "", "response": t} for t in texts], tokenizer, 32)


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
    from fedpeat.data import collate

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


def test_emulator_module_names_follow_the_layer_map() -> None:
    assert to_emulator_modules(
        ["layers.6.mlp.up_proj", "layers.0.self_attn.q_proj"], [0, 1, 2, 5, 6, 7]
    ) == [
        "layers.4.mlp.up_proj",
        "layers.0.self_attn.q_proj",
    ]


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


TIERS = (
    "devices.profiles=[{name:big,memory_mb:170},{name:mid,memory_mb:157},"
    "{name:small,memory_mb:100},{name:watch,memory_mb:30}]"
)


@pytest.mark.parametrize("aggregation", ["exact", "fedavg"])
def test_planned_run_gives_devices_different_plans(
    tmp_path, monkeypatch, server_identity, aggregation
) -> None:
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices"))
    # Devices report native bf16 whatever this host has, so the plans (and this test) do not
    # depend on the CPU: quantized plans then compute in bf16 and 16-bit plans are offered.
    monkeypatch.setattr("fedpeat.task.fast_bf16", lambda device: True)
    cfg = _planner_cfg(TIERS, "planner.upload_mb=0.3", f"strategy.aggregation={aggregation}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(4)
    _run(grid, cfg, run_dir)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 3 and np.isfinite(rows[-1]["plugin_ppl"])
    _check_residuals(grid, aggregation)
    for row in rows[1:]:
        devices = row["devices"]
        assert len(devices) == 3 and all(d["status"] == "ok" for d in devices)
        assert len({d["bits"] for d in devices}) >= 2
        assert len({d["rank"] for d in devices}) >= 2
        assert all(d["modules"] and d["est_memory_mb"] for d in devices)
        # every plan fits its own device's budget (partition i has profile i of TIERS)
        budgets = [170.0, 157.0, 100.0, 30.0]
        assert all(d["est_memory_mb"] <= budgets[d["partition"]] for d in devices)
        (skip,) = row["skipped"]
        assert skip["reason"].startswith("memory budget 30 MB <")
    importance = json.loads((run_dir / "importance.json").read_text())
    assert importance["chosen"] and importance["chosen_params"] <= importance["budget_params"]
    assert (run_dir / "merged" / "config.json").is_file()
    region = adapter_region(8, 2, 2)
    assert all(int(m.split(".")[1]) in region for m in importance["chosen"])


def _check_residuals(grid: InProcessGrid, aggregation: str) -> None:
    """exact: a device below the server rank also gets the rest of the global adapter, and
    share + rest is the global product of every module it trains; fedavg sends no rest."""
    from fedpeat.task import Plan
    from strategies.aggregation import lora_pairs

    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    with_rest = [m for m in train if "residual" in m.content.array_records]
    if aggregation == "fedavg":
        assert not with_rest
        return
    round2 = [
        m
        for m in train
        if Plan.from_json(str(m.content.config_records["plan"]["plan"])).server_round == 2
    ]
    # round 1's global adapter has B = 0: nothing beyond any rank; round 2's has
    assert any("residual" in m.content.array_records for m in round2)
    # Every device's share + rest gives the same product per module: the global adapter's.
    products: dict[str, np.ndarray] = {}
    compared = 0
    for msg in round2:
        share = {k: v.numpy() for k, v in msg.content.array_records["adapter"].items()}
        record = msg.content.array_records.get("residual")
        rest = {k: v.numpy() for k, v in record.items()} if record is not None else {}
        for module, (a, b) in lora_pairs(share).items():
            total = share[b] @ share[a] + (rest[b] @ rest[a] if a in rest else 0.0)
            if module in products:
                np.testing.assert_allclose(total, products[module], atol=1e-5)
                compared += 1
            products[module] = total
    assert compared  # devices of different ranks shared a module
