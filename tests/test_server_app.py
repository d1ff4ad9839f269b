"""Whole runs of the real ServerApp path against an in-process grid of real ClientApps: caching,
the FedPEAT cases, controllers, baselines, planned runs, and faulty devices."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from flwr.app import Message, MessageType

import fedpeat.device as dev
from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from fedpeat.emulator import adapter_region, select_layers
from fedpeat.model import load_model
from fedpeat.outputs import read_metrics
from fedpeat.protocol import METRICS_KEY
from server_app.app import _run
from strategies.round_stats import content_bytes
from tests.helpers import adapter_of, final_state, with_adapter


def _arrays(msg):
    for record in msg.content.array_records.values():
        for arr in record.values():
            yield arr.numpy()


# The default and fedpipe experiments' emulator geometry (levels, adapter region, layer choice,
# planner) on a random model with the default model's 30 layers, so the check runs in seconds.
GEOMETRY = "model=tiny_llama model.tiny.num_layers=30 rounds=1 train.local_steps=1"
GEOMETRY += " emulator.distill.steps=2 data.max_samples=600 data.server_eval_samples=16"
GEOMETRY += " eval.emulator_gap=false"


@pytest.mark.parametrize(
    "overrides",
    [
        "experiment=tiny rounds=3",
        f"{GEOMETRY} planner.calibration_batches=1",
        f"experiment=fedpipe {GEOMETRY} planner.calibration_batches=1",
    ],
    ids=["tiny", "default", "fedpipe"],
)
def test_no_dropped_layer_ever_leaves_the_server(
    overrides, tmp_path, server_identity, device_disks
) -> None:
    cfg = compose(overrides)
    tiny = cfg.experiment == "tiny"
    grid = InProcessGrid(3 if tiny else 6)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")

    full = load_model(cfg.model, cached=False)
    n = full.config.num_hidden_layers
    # The wire carries fp16: compare against the fp16-rounded weights of each dropped layer.
    # 1-D tensors (norms start as all ones in every layer) cannot tell layers apart: skip them.
    layer_weights = {
        i: [p.detach().half().numpy() for p in full.model.layers[i].parameters() if p.ndim >= 2]
        for i in range(n)
    }
    checked = 0
    for msg in grid.sent:
        if (
            "plan" not in msg.content.config_records
            or "plan" not in msg.content.config_records["plan"]
        ):
            continue
        from fedpeat.protocol import Plan

        plan = Plan.from_json(str(msg.content.config_records["plan"]["plan"]))
        if not plan.emulator.digest:  # a profile request: no model at all
            assert not any(True for _ in _arrays(msg)), msg.metadata.message_type
            continue
        kept = set(plan.emulator.layers)
        assert len(kept) <= n // 2, f"an emulator of {len(kept)} of {n} layers was sent"
        if plan.emulator.keep_ratio != 0:  # the layer map agrees with the documented rule
            e = cfg.emulator
            if e.layer_choice == "uniform":
                assert kept == set(select_layers(n, e.bottom, e.top, plan.emulator.keep_ratio))
        dropped = set(range(n)) - kept
        assert dropped
        for arr in _arrays(msg):
            for i in dropped:
                for w in layer_weights[i]:
                    if arr.shape == w.shape:
                        checked += 1
                        assert not np.array_equal(arr.astype(np.float16), w), f"layer {i} was sent"
    assert checked > 0
    # Sanity of the check itself: kept layers do appear on the wire.
    emulator_msgs = [m for m in grid.sent if "emulator" in m.content.array_records]
    assert emulator_msgs
    sent = [a for m in emulator_msgs for a in _arrays(m)]
    assert any(
        np.array_equal(a, layer_weights[0][0]) for a in sent if a.shape == layer_weights[0][0].shape
    )

    # Every byte that left the server is in metrics.jsonl, and every byte that came back.
    assert sum(content_bytes(m.content) for m in grid.sent) == sum(r["bytes_down"] for r in rows)
    if cfg.experiment == "system":  # the whole system: the shipped policy and FedPipe plans
        assert cfg.controller.name == "ppo" and cfg.planner.enabled
        row = rows[1]
        # One round, shorter than an online update: the policy acts greedily.
        assert row["decided"] == "ppo-greedy" and len(row["action"]) == 6
        trained = [d for d in row["devices"] if d["status"] == "ok"]
        assert trained and all(d["rank"] and d["batch"] and d["modules"] for d in trained)
        assert all(d["bits"] in cfg.planner.bits for d in trained)
    if not tiny:
        return
    # Round 1 sent each device its emulator; later rounds, same assignment, sent none.
    assert rows[1]["exchanges"] == 3 and rows[1]["emulator_bytes"] > 0
    assert all(r["exchanges"] == 0 and r["emulator_bytes"] == 0 for r in rows[2:])
    assert all(not d["emulator_sent"] for r in rows[2:] for d in r["devices"])
    levels = sorted(d["level"] for d in rows[1]["devices"])
    assert levels == [0.2, 0.4, 0.4]  # budgets 160, 155, 160 MB (experiment/tiny.yaml)
    # One exchange a round: the devices evaluated the adapter they received inside training.
    assert all(r["received_emulator_ppl"] is not None for r in rows[1:])
    assert not any(m.metadata.message_type == MessageType.EVALUATE for m in grid.sent)
    assert all(r["emulator_ppl"] is None for r in rows[1:])
    assert rows[-1]["plugin_ppl"] < rows[0]["plugin_ppl"]


def test_received_figure_is_the_previous_rounds_evaluation(
    tmp_path, server_identity, device_disks
) -> None:
    """With the second exchange on as well, the figure a device measures before training in
    round 2 is the one it measured on the same adapter after round 1: the same emulator, data
    and adapter, only measured one exchange later."""
    cfg = compose("experiment=tiny strategy.fraction_evaluate=1")
    grid = InProcessGrid(3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[1]["emulator_ppl"] is not None and rows[2]["received_emulator_ppl"] is not None
    assert rows[2]["received_emulator_ppl"] == pytest.approx(rows[1]["emulator_ppl"], rel=1e-4)
    # Round 1's devices received the initial adapter (B = 0): the base emulators' perplexity.
    assert rows[1]["received_emulator_ppl"] != pytest.approx(rows[1]["emulator_ppl"], rel=1e-3)
    assert sum(m.metadata.message_type == MessageType.EVALUATE for m in grid.sent) == 6


def _layers_of(state: dict[str, np.ndarray]) -> set[int]:
    return {int(m.group(1)) for k in state if (m := re.search(r"\.layers\.(\d+)\.", k))}


@pytest.mark.parametrize("rule", ["fedavg", "exact"])
def test_held_adapters_cover_every_layer_an_emulator_holds(
    rule, tmp_path, server_identity, device_disks
) -> None:
    cfg = compose(
        "experiment=tiny rounds=2 emulator.adapt=held strategy.server_train=false "
        f"strategy.aggregation={rule}"
    )
    grid = InProcessGrid(3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(grid, cfg, run_dir)
    e, n = cfg.emulator, cfg.model.tiny.num_layers
    union = {i for lv in e.levels for i in select_layers(n, e.bottom, e.top, lv)}
    region = set(adapter_region(n, e.bottom, e.top))
    assert union > region  # kept middle layers carry adapters too
    from fedpeat.protocol import Plan

    trained = 0
    for msg in grid.sent:
        if msg.metadata.message_type != "train" or "plan" not in msg.content.config_records:
            continue
        plan = Plan.from_json(str(msg.content.config_records["plan"]["plan"]))
        # Each device receives exactly the adapter layers its emulator holds.
        assert _layers_of(adapter_of(msg)) == set(plan.emulator.layers)
        assert len(plan.emulator.layers) <= n // 2
        trained += 1
    assert trained == 6
    final = final_state(run_dir)
    assert _layers_of(final) == union
    # The middle layers' adapters learned (B starts at zero), and the plug-in improved.
    middle_b = [v for k, v in final.items() if "lora_B" in k and _layers_of({k: v}) - region]
    assert middle_b and any(np.abs(b).sum() > 0 for b in middle_b)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all(r["num_clients"] == 3 for r in rows[1:])
    assert rows[-1]["plugin_ppl"] < rows[0]["plugin_ppl"]


def test_knowledge_back_aligns_the_exported_plugin_only(
    tmp_path, server_identity, device_disks
) -> None:
    """After the last round the plug-in's adapter learns from the emulator carrying it; the
    exported adapter is the aligned one where that scored better on validation, else the
    devices'; the checkpoint (what a resumed run continues from) keeps what the devices
    trained, and the row keeps the figures from before."""
    from server_app.recorder import improved

    # The rule by hand: the first task metric decides where there is one, else perplexity.
    assert improved({"plugin_ppl": 9.0}, {"plugin_ppl": 8.0}, None)
    assert not improved({"plugin_ppl": 8.0}, {"plugin_ppl": 8.0}, None)
    worse_ppl = {"plugin_ppl": 9.5, "task": {"bleu": 31.0}}
    assert improved({"plugin_ppl": 9.0, "task": {"bleu": 30.0}}, worse_ppl, "bleu")
    assert not improved({"plugin_ppl": 9.9, "task": {"bleu": 31.0}}, worse_ppl, "bleu")

    from safetensors.numpy import load_file

    cfg = compose(
        "experiment=tiny rounds=2 emulator.adapt=held strategy.server_train=false "
        "emulator.align.steps=4 emulator.align.samples=16 emulator.align.max_new_tokens=8"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert "align" not in rows[1]
    align = rows[2]["align"]
    assert (
        align["steps"] == 4 and align["sequences"] == 16 and align["level"] in cfg.emulator.levels
    )
    assert align["decided_by"] == "plugin_ppl"
    assert rows[2]["gap"]["plugin_ppl"] == rows[2]["plugin_ppl"]
    devices = final_state(run_dir)
    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert set(exported) == set(devices)
    changed = any(not np.array_equal(exported[k], devices[k]) for k in devices)
    assert changed == align["kept"]
    if align["kept"]:
        assert rows[2]["plugin_ppl"] < align["plugin_ppl_before"]
    else:
        assert rows[2]["plugin_ppl"] == align["plugin_ppl_before"]


def test_devices_that_hold_the_emulator_are_not_sent_it_again(
    tmp_path, server_identity, device_disks
) -> None:
    cfg = compose("experiment=tiny rounds=1")
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        _run(InProcessGrid(2), cfg, run_dir)
    # The second run's devices reported the digests on their disks: nothing to send.
    first, second = (read_metrics(tmp_path / f"run{i}" / "metrics.jsonl")[1] for i in range(2))
    assert first["exchanges"] == 2 and second["exchanges"] == 0


def test_a_corrupt_device_cache_is_refetched(tmp_path, server_identity, device_disks) -> None:
    cfg = compose("experiment=tiny rounds=3")

    def corrupt_after_round_1(msg, node):
        plan = msg.content.config_records.get("plan", {})
        if (
            '"server_round": 2' in str(plan.get("plan", ""))
            and msg.metadata.message_type == "train"
            and node == 1000  # device-0's own message (once: a second flip would undo it)
        ):
            # As in deployment, where each round starts a fresh ClientApp process: no
            # in-memory copy of the emulator survives, the disk is all the device has.
            dev._EMULATORS.clear()
            for path in (device_disks / "device-0").glob("*.safetensors"):
                raw = bytearray(path.read_bytes())
                raw[-5] ^= 0xFF
                path.write_bytes(bytes(raw))
        return None

    grid = InProcessGrid(2, fail=corrupt_after_round_1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert any("corrupt" in r["reason"] for r in rows[2]["rejected"])
    assert rows[2]["num_clients"] == 1
    assert rows[3]["exchanges"] == 1  # resent to the device that dropped it
    assert rows[3]["num_clients"] == 2


@pytest.mark.parametrize("case", [2, 3])
def test_other_fedpeat_cases_run(tmp_path, server_identity, device_disks, case: int) -> None:
    name = {2: "shared", 3: "none"}[case]
    # The shared level both tiny devices can hold (budgets 160 and 155 MB; keep 0.2: 153.0 MB).
    cfg = compose(f"experiment=tiny emulator={name} emulator.shared_level=0.2 rounds=1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    row = read_metrics(run_dir / "metrics.jsonl")[1]
    assert row["num_clients"] == 2
    if case == 3:
        assert row["exchanges"] == 0 and all(d["level"] == 1.0 for d in row["devices"])
    else:
        assert row["exchanges"] == 2 and all(d["level"] == 0.2 for d in row["devices"])


def test_server_training_joins_the_average(tmp_path, server_identity, device_disks) -> None:
    with_server = compose("experiment=tiny rounds=1")
    without = compose("experiment=tiny rounds=1 strategy.server_train=false")
    finals = []
    for i, cfg in enumerate((with_server, without)):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        _run(InProcessGrid(2), cfg, run_dir)
        finals.append(read_metrics(run_dir / "metrics.jsonl")[1])
    assert finals[0]["server_train_loss"] is not None and finals[1]["server_train_loss"] is None
    assert finals[0]["plugin_ppl"] != finals[1]["plugin_ppl"]


def test_exact_aggregation_runs_and_reports_its_truncation(
    tmp_path, server_identity, device_disks
) -> None:
    cfg = compose("experiment=tiny rounds=2 strategy.aggregation=exact")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(3), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    # 3 devices + the server, each rank 8, truncated back to rank 8: something is discarded.
    assert all(r["truncation_error"] is not None and r["truncation_error"] >= 0 for r in rows[1:])
    assert rows[-1]["plugin_ppl"] < rows[0]["plugin_ppl"]


def test_oort_selects_in_a_federated_run(tmp_path, server_identity, device_disks) -> None:
    cfg = compose("experiment=tiny controller=oort rounds=1")
    run_dir = tmp_path / "oort"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    row = read_metrics(run_dir / "metrics.jsonl")[1]
    chosen = [lv for lv in row["action"].values() if lv is not None]
    assert len(chosen) == 1 and row["num_clients"] == 1 and np.isfinite(row["reward"])
    assert any(s["reason"] == "oort: not chosen this round" for s in row["skipped"])


def test_controllers_choose_devices_and_price_the_rounds(
    tmp_path, server_identity, device_disks
) -> None:
    import json

    import torch

    # greedy with half the devices: one of two each round, at its best fitting level.
    cfg = compose("experiment=tiny controller=greedy rounds=2 controller.target_ppl=1e9")
    run_dir = tmp_path / "greedy"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row in rows[1:]:
        chosen = [lv for lv in row["action"].values() if lv is not None]
        assert len(row["action"]) == 2 and len(chosen) == 1 and row["num_clients"] == 1
        assert row["latency_s"] > 0 and np.isfinite(row["reward"])
        assert any(s["reason"] == "greedy: not chosen this round" for s in row["skipped"])
        assert row["decided"] == "greedy"
    summary = json.loads((run_dir / "summary.json").read_text())
    # the target is met at round 0 already (1e9): no modelled time spent
    assert summary["time_to_target_s"] == 0.0 and summary["controller"] == "greedy"
    assert summary["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] for r in rows)

    # fixed at keep 0.4: the small device (155 MB) cannot hold it (157.4 MB): a violation,
    # not sent; an untrained PPO policy learns online every round and saves its state.
    cfg = compose("experiment=tiny controller=fixed controller.fixed_level=0.4 rounds=1")
    run_dir = tmp_path / "fixed"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    row = read_metrics(run_dir / "metrics.jsonl")[1]
    assert row["num_clients"] == 1 and row["violations"] == 1
    assert "fixed chose keep 0.4, which needs" in row["skipped"][0]["reason"]

    cfg = compose(
        "experiment=tiny controller=ppo controller.ppo.checkpoint='' "
        "controller.ppo.online_every=1 rounds=2"
    )
    run_dir = tmp_path / "ppo"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all(np.isfinite(r["reward"]) for r in rows[1:])
    state = torch.load(run_dir / "controller.pt", weights_only=False)
    assert state["controller"]["updates"] == 2 and state["round"] == 2
    assert [r["decided"] for r in rows] == [None, "ppo-sampled", "ppo-sampled"]


def test_fed_ft_trains_and_sends_every_weight(tmp_path, server_identity, device_disks) -> None:
    import json

    cfg = compose("experiment=tiny emulator=none strategy.name=fed_ft rounds=1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    full = load_model(cfg.model, cached=False)
    model_bytes = sum(p.numel() * 4 for p in full.parameters())  # fp32, tied weights once
    row = rows[1]
    assert row["num_clients"] == 2 and row["exchanges"] == 0
    # the whole model goes down to each device (train and evaluate) and up from each
    for d in row["devices"]:
        assert d["bytes_down"] >= model_bytes and d["bytes_up"] >= model_bytes
    assert row["latency_s"] > 0
    assert not (run_dir / "adapter").exists()
    tuned = type(full).from_pretrained(run_dir / "merged")
    changed = [
        n
        for (n, a), b in zip(full.named_parameters(), tuned.parameters(), strict=True)
        if not np.allclose(a.detach().numpy(), b.detach().numpy())
    ]
    assert len(changed) == len(list(full.parameters()))  # every weight trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bytes_total"] >= 4 * model_bytes


def test_gsm8k_jsonl_run_by_overrides_only(tmp_path, server_identity, device_disks, gsm8k_path):
    # A real JSONL data set chosen by overrides alone (flwr run itself: tests/test_e2e.py).
    from fedpeat.config import resolve_paths

    overrides = f"experiment=tiny data=jsonl data.path={gsm8k_path} data.max_samples=300 rounds=1"
    cfg = resolve_paths(compose(overrides), tmp_path)
    assert cfg.data.source == "jsonl"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2), cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["num_clients"] for r in rows] == [0, 2]
    assert all(d["examples"] > 0 for d in rows[1]["devices"])
    assert rows[1]["plugin_ppl"] < rows[0]["plugin_ppl"]


# ------------------------------------------------------------------ planned runs (FedPipe)


def _planner_cfg(*extra: str):
    return compose(["experiment=tiny", "planner=fedpipe", *extra])


TIERS = (
    "devices.profiles=[{name:big,memory_mb:160},{name:mid,memory_mb:145},"
    "{name:small,memory_mb:141},{name:watch,memory_mb:30}]"
)


@pytest.mark.parametrize("aggregation", ["exact", "fedavg"])
def test_planned_run_gives_devices_different_plans(
    tmp_path, monkeypatch, server_identity, aggregation
) -> None:
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices"))
    # Devices report native bf16 whatever this host has, so the plans (and this test) do not
    # depend on the CPU: quantized plans then compute in bf16 and 16-bit plans are offered.
    monkeypatch.setattr("fedpeat.device.fast_bf16", lambda device: True)
    cfg = _planner_cfg(TIERS, "planner.upload_mb=0.03", f"strategy.aggregation={aggregation}")
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
        budgets = [160.0, 145.0, 141.0, 30.0]
        assert all(d["est_memory_mb"] <= budgets[d["partition"]] for d in devices)
        (skip,) = row["skipped"]
        assert skip["reason"].startswith("memory budget 30 MB <")
    importance = json.loads((run_dir / "importance.json").read_text())
    assert importance["chosen"] and importance["chosen_params"] <= importance["budget_params"]
    assert (run_dir / "merged" / "config.json").is_file()
    region = adapter_region(12, 1, 1)
    assert all(int(m.split(".")[1]) in region for m in importance["chosen"])


def test_stacking_keeps_every_devices_block(tmp_path, monkeypatch, server_identity) -> None:
    """FLoRA-style stacking in a planned run: each device trains a fresh block (zero B) on top
    of the stack so far (frozen), and the global adapter ends holding one block per update."""
    from fedpeat.protocol import RESIDUAL_KEY
    from strategies.aggregation import stack_used

    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices"))
    cfg = _planner_cfg(
        TIERS,
        "strategy.aggregation=stack",
        "strategy.server_train=false",
        "planner.server_rank=64",
        "planner.ranks=[2,4,8]",
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(4)
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    trained = [d for row in rows[1:] for d in row["devices"] if d["status"] == "ok"]
    assert len(trained) == 6  # three devices (the watch fits nothing) in each of two rounds
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(not b.any() for m in train_msgs for k, b in adapter_of(m).items() if "lora_B" in k)
    round2 = [m for m in train_msgs if '"server_round": 2' in str(m.content.config_records)]
    assert len(round2) == 3 and all(RESIDUAL_KEY in m.content.array_records for m in round2)
    # One block of each update's rank, none overwritten: the stack fills their sum.
    assert stack_used(final_state(run_dir)) == sum(d["rank"] for d in trained)
    assert rows[-1]["plugin_ppl"] < rows[0]["plugin_ppl"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def _check_residuals(grid: InProcessGrid, aggregation: str) -> None:
    """exact: a device below the server rank also gets the rest of the global adapter, and
    share + rest is the global product of every module it trains; fedavg sends no rest."""
    from fedpeat.protocol import Plan
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


# ------------------------------------------------------------------ faulty devices


# Generous: an honest tiny device trains in about a second, but a loaded 2-core runner is slow.
ROUND_TIMEOUT_S = 15.0


HONEST = (0, 6, 7)


def _misbehave(msg: Message, node: int, reply: Message) -> Message | None:
    """Partition 1 raises, 2 returns NaN, 3 wrong shapes, 4 an update scaled x1e4, 5 answers
    after the round's deadline, 9 trains honestly but claims a million examples."""
    if msg.metadata.message_type != "train" or reply.has_error():
        return reply
    pid, sent, got = node - 1000, adapter_of(msg), adapter_of(reply)
    first = next(iter(got))
    if pid == 1:
        raise RuntimeError("CUDA error: device-side assert triggered")
    if pid == 2:
        got[first] = np.full_like(got[first], np.nan)
    elif pid == 3:
        got[first] = np.zeros((got[first].shape[0] + 1, *got[first].shape[1:]), np.float32)
    elif pid == 4:
        got = {k: (sent[k] + 1e4 * (v - sent[k])).astype(np.float32) for k, v in got.items()}
    elif pid == 5:
        time.sleep(ROUND_TIMEOUT_S + 0.5)
    elif pid == 9:
        reply.content.metric_records[METRICS_KEY]["num-examples"] = 1_000_000
    return with_adapter(reply, got)


def test_faulty_devices_are_rejected_and_the_adapter_is_the_honest_ones(
    tmp_path, server_identity, device_disks
) -> None:
    overrides = [
        "experiment=tiny",
        "rounds=1",  # one round shows it; each round sleeps through the deadline once
        f"strategy.round_timeout_s={ROUND_TIMEOUT_S}",
        "strategy.min_nodes=1",
        "strategy.fraction_evaluate=0",
    ]
    cfg = compose(overrides)
    faulty = tmp_path / "faulty"
    faulty.mkdir()
    grid = InProcessGrid(10, tamper=_misbehave)

    def memory_taken(msg: Message, node: int) -> None:
        # Partition 8 profiled with room to spare; by training time something else took its
        # memory: only the device itself can notice, and it must refuse.
        if msg.metadata.message_type == "train" and node == 1008:
            grid.contexts[node].node_config["memory-mb"] = 1
        return None

    grid.fail = memory_taken
    _run(grid, cfg, faulty)
    rows = read_metrics(faulty / "metrics.jsonl")
    assert len(rows) == 2 and (faulty / "summary.json").is_file()
    for row in rows[1:]:
        reasons = {r["node"] - 1000: r["reason"] for r in row["rejected"]}
        assert sorted(reasons) == [1, 2, 3, 4, 5, 8, 9], reasons
        assert "device error: RuntimeError: CUDA error" in reasons[1]
        assert "non-finite" in reasons[2]
        assert "shape" in reasons[3]
        assert "update norm" in reasons[4] and "x the round's median" in reasons[4]
        assert "no reply within strategy.round_timeout_s=15" in reasons[5]
        assert "memory budget 1 MB (node config memory-mb) <" in reasons[8]
        assert "estimated for this plan" in reasons[8]
        assert "num-examples 1e+06 exceeds the" in reasons[9] and "reported" in reasons[9]
        status = {d["partition"]: d["status"] for d in row["devices"]}
        assert sorted(p for p, s in status.items() if s == "ok") == sorted(HONEST)
        assert status[5] == "timeout" and status[4] == "rejected"
        assert row["num_clients"] == 3

    # The same run with only the honest devices (same partitions of the same split).
    honest = tmp_path / "honest"
    honest.mkdir()
    _run(InProcessGrid(10, partitions=HONEST), cfg, honest)
    want, got = final_state(honest), final_state(faulty)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert read_metrics(honest / "metrics.jsonl")[-1]["rejected"] == []


def test_too_few_valid_replies_keep_the_adapter(tmp_path, server_identity, device_disks) -> None:
    cfg = compose(["experiment=tiny", "rounds=1", "strategy.min_replies=2", "strategy.min_nodes=1"])

    def one_fails(msg: Message, node: int, reply: Message) -> Message | None:
        if msg.metadata.message_type == "train" and node == 1001:
            raise RuntimeError("out of battery")
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(2, tamper=one_fails)
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    # one valid update < min_replies=2: the adapter stays the initial one (B = 0: base model)
    assert rows[1]["plugin_ppl"] == pytest.approx(rows[0]["plugin_ppl"], rel=1e-6)
    assert rows[1]["rejected"][0]["reason"].endswith("out of battery")


def test_the_policy_without_a_profiled_device_leaves_the_round_to_the_server(
    tmp_path, server_identity, device_disks
) -> None:
    """Every device fails its profile query (as 20 devices on 38 plays once did): the policy
    has no device to score, and the run goes on with the server's own update."""
    from flwr.app import MessageType

    cfg = compose("experiment=tiny controller=ppo rounds=1")

    def no_profile(msg, node, reply):
        if msg.metadata.message_type == MessageType.QUERY:
            raise RuntimeError("DataError: no data for this device")
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(InProcessGrid(2, tamper=no_profile), cfg, run_dir)
    base, row = read_metrics(run_dir / "metrics.jsonl")
    assert row["num_clients"] == 0 and row["decided"] is None
    assert row["plugin_ppl"] < base["plugin_ppl"]  # the server's own update
