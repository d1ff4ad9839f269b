"""The server's model: the merged export and the adapter's modules under the planner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeat.config import compose
from fedpeat.lora import initial_adapter_state, set_adapter_state
from fedpeat.model import load_model
from fedpeat.server_model import ServerModel


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
    # Exporting left the base as it was: its config (emulators' digests derive from it) too.
    assert base.config.architectures is None and server.base is base


def _ptrs(module: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


def test_the_server_holds_one_copy_of_the_weights() -> None:
    """The plug-in model and every emulator are views of the base model's tensors; an emulator
    owns only its middle layers, one emulator is resident at a time, and every package built
    stays known by digest and size while the server keeps none of its tensors."""
    from fedpeat.emulator import build_emulator, middle_parameters, package

    server = ServerModel(compose("experiment=tiny emulator.distill.steps=2"))
    base = _ptrs(server.base)
    frozen = [p for n, p in server.model.named_parameters() if "lora_" not in n]
    assert {p.data_ptr() for p in frozen} <= base  # no second copy of any frozen weight
    digests = {}
    for level in server.device_levels():
        emulator = server.emulator(level)
        own = {p.data_ptr() for p in middle_parameters(emulator).values()}
        assert _ptrs(emulator.model) - own <= base and not own & base
        assert list(server.emulators) == [level]  # the previous one was dropped
        pkg = server.package(level)
        digests[level] = pkg.digest
        # The same wire bytes as an emulator built as a full copy and distilled the same way.
        copied = build_emulator(server.base, level, 1, 1, scores=server.layer_scores)
        with torch.no_grad():
            for key, p in middle_parameters(copied).items():
                p.copy_(middle_parameters(emulator)[key])
        assert package(copied).digest == pkg.digest
    assert server.package_digests() == digests
    assert all(server.package_ref(lv)[1] > 0 for lv in digests)


def test_fixed_modules_replace_the_importance_choice(tiny_cfg) -> None:
    modules = ["layers.0.self_attn.q_proj", "layers.11.mlp.down_proj"]
    server = ServerModel(_planner_cfg(f"adapter.modules=[{','.join(modules)}]"))
    assert server.adapter_cfg.modules == modules and server.importance["choice"].startswith("fixed")
    assert all(
        ".layers.0.self_attn.q_proj." in k or ".layers.11.mlp.down_proj." in k
        for k in server.initial_state
    )
    with pytest.raises(ValueError, match="adapter.modules"):
        ServerModel(_planner_cfg("adapter.modules=[layers.3.self_attn.q_proj]"))  # not in region


def _prompt_data(tmp_path) -> str:
    import json

    rows = [
        {
            "mr": f"name[R{p}], food[F{p % 3}]",
            "ref": f"R{p} serves food {p % 3} ({r}).",
            "name": f"R{p % 5}",
        }
        for p in range(40)
        for r in range(2)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (
        f"experiment=tiny data=jsonl data.path={path} data.prompt_field=mr "
        "data.response_field=ref data.max_length=32 data.server_fraction=0.4 "
        "eval.metrics=[bleu,rouge_l] eval.max_new_tokens=6 eval.bootstrap=50"
    )


def test_report_scores_generations_on_the_test_prompts(tmp_path) -> None:
    server = ServerModel(compose(_prompt_data(tmp_path)))
    assert len(server.prompts["validation"]) == 8 and len(server.prompts["test"]) == 8
    report = server.report(server.initial_state, "test")
    assert report["prompts"] == 8 and report["samples"] == 16
    for metric in ("bleu", "rouge_l"):
        assert 0.0 <= report[metric] <= 100.0
        lo, hi = report[f"{metric}_ci"]
        assert (lo <= report[metric] + 1e-9 and report[metric] <= hi + 1e-9) or lo <= hi
    lo, hi = report["ppl_ci"]
    assert lo <= report["ppl"] <= hi
    # The emulator carrying the adapter is scored on the same prompts (the gap).
    emu = server.report(server.initial_state, "test", level=0.4)
    assert emu["prompts"] == 8 and emu["ppl"] != report["ppl"]


def test_gap_level_is_the_level_most_devices_trained_on() -> None:
    from server_app.recorder import gap_level
    from strategies.round_stats import DeviceRound, RoundStats

    cfg = compose("experiment=tiny")
    stats = RoundStats()
    for node, level in enumerate([0.2, 0.4, 0.2]):
        stats.devices[node] = DeviceRound(node, node, level, False, 0, status="ok")
    assert gap_level(cfg, stats) == 0.2
    stats.devices[3] = DeviceRound(3, 3, 0.4, False, 0, status="ok")
    assert gap_level(cfg, stats) == 0.4  # a tie goes to the larger emulator
    assert gap_level(cfg, RoundStats()) == 0.2  # before any device: the smallest level
    assert gap_level(compose("experiment=tiny emulator=none"), stats) is None


def test_held_adapter_covers_the_levels_layers_and_devices_pay_for_their_part() -> None:
    server = ServerModel(compose("experiment=tiny emulator.adapt=held"))
    # 12 layers, 1 + 1 region; keep 0.4 holds 0, 1, 4, 7, 10, 11 and keep 0.2 holds 0, 1, 10, 11.
    assert server.adapter_layers == [0, 1, 4, 7, 10, 11]
    part = server.device_adapter_state(server.initial_state, 0.2)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in part}
    assert layers == {0, 1, 10, 11}
    # Every layer carries the same modules: the keep-0.2 device trains 4/6 of the adapter.
    assert 6 * sum(v.size for v in part.values()) == 4 * server.adapter_params
    own = server.memory_need_mb(0.2, adapter_params=4 * server.adapter_params // 6)
    assert (
        server.memory_need_mb(0.2)
        == own
        < server.memory_need_mb(0.2, adapter_params=server.adapter_params)
    )


def test_the_derived_deadline_is_the_fleets_not_only_the_chosen_devices() -> None:
    """One fast device chosen in a fleet with a slow one: the deadline is the slow device's
    leanest plan, so the fast device is not held to its own leanest plan (rank 2, batch 1)."""
    from dataclasses import replace

    from fedpeat.allocation import fleet_limits
    from strategies.planning import leanest_level, options_for, plan_round

    cfg = _planner_cfg("planner.straggler_deadline=true")
    server = ServerModel(cfg)
    base = cfg.devices.profiles[0]
    profiles = {0: replace(base, gflops=100.0), 1: replace(base, name="slow", gflops=2.0)}
    size, sent = (lambda n: 100), (lambda n, lv: 1e6)
    _, plans, _ = plan_round(cfg, server, profiles, [0, 1], {0: 1, 1: 0}, size, sent)
    plan = plans[0]
    assert not isinstance(plan, str)
    level = cfg.emulator.levels[0]
    own = {0: options_for(server, level, profiles[0], 100, 1e6)}
    lean = leanest_level(cfg, server, profiles[1])
    assert lean is not None
    fleet = own | {1: options_for(server, lean, profiles[1], 100, 1e6)}
    budgets = {n: p.memory_mb for n, p in profiles.items()}
    own_deadline = fleet_limits(own, budgets, 0.0, True)[0]
    fleet_deadline = fleet_limits(fleet, budgets, 0.0, True)[0]
    assert fleet_deadline > 2 * own_deadline
    assert own_deadline < plan.time_s <= fleet_deadline
    assert (plan.rank, plan.batch) != (min(cfg.planner.ranks), min(cfg.planner.batch_sizes))


def test_server_training_with_checkpointing_equals_without() -> None:
    """Activation checkpointing changes what is kept for the backward, not the update; it is
    the plug-in twin's setting, the base model (emulators are cut from it) is untouched."""
    states = {}
    for on in (False, True):
        server = ServerModel(compose(f"experiment=tiny strategy.server_checkpointing={on}"))
        states[on], _, _ = server.train(server.initial_state, 1)
        assert server.model.get_base_model().model.gradient_checkpointing is on
        assert not server.base.model.gradient_checkpointing
    for key in states[True]:
        np.testing.assert_array_equal(states[True][key], states[False][key])
