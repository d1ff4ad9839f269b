"""The benchmark's arithmetic on hand-built metrics rows (the runs themselves are `make bench`)."""

from __future__ import annotations

import pytest

from bench.common import table
from bench.federated import plan_runs
from bench.federated_report import (
    bytes_until,
    device_steps,
    per_device_bytes,
    reached_round,
    round_overhead,
    spread,
)


def _dev(level: float, down: int, up: int, sent: bool, status: str = "ok", **kw: float) -> dict:
    return {
        "level": level,
        "bytes_down": down,
        "bytes_up": up,
        "emulator_sent": sent,
        "status": status,
        "partition": 0,
        **kw,
    }


ROWS = [
    {"round": 0, "plugin_ppl": 115.0, "elapsed_s": 10.0},
    {
        "round": 1,
        "plugin_ppl": 109.0,
        "bytes_down": 1000,
        "bytes_up": 20,
        "elapsed_s": 70.0,
        "eval_s": 8.0,
        "devices": [
            _dev(0.5, 900, 10, True, train_s=6.0, handler_s=9.0),
            _dev(0.75, 100, 10, False, train_s=4.0, handler_s=5.0),
            _dev(0.25, 50, 0, True, status="rejected"),
        ],
        "timing": {
            "configure": 3.0,
            "profile": 2.0,
            "train_exchange": 12.0,
            "evaluate_exchange": 4.0,
            "client_eval_sum": 2.0,
            "server_train": 5.0,
            "aggregate": 1.0,
        },
    },
    {
        "round": 2,
        "plugin_ppl": 101.0,
        "bytes_down": 200,
        "bytes_up": 20,
        "elapsed_s": 100.0,
        "devices": [_dev(0.5, 100, 10, False, train_s=5.0)],
    },
    {"round": 3, "plugin_ppl": 99.0, "bytes_down": 300, "bytes_up": 30, "elapsed_s": 130.0},
]


def test_spread_by_hand() -> None:
    s = spread([1.0, 2.0, 6.0])
    assert s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)  # sample std: n - 1
    assert (s["min"], s["max"], s["n"]) == (1.0, 6.0, 3)
    assert spread([5.0])["std"] == 0.0


def test_target_round_and_bytes_until_it() -> None:
    assert reached_round(ROWS, 105.0) == 2
    assert reached_round(ROWS, 120.0) == 0  # the base model already there
    assert reached_round(ROWS, 50.0) is None
    assert bytes_until(ROWS, 2) == 1000 + 20 + 200 + 20
    assert bytes_until(ROWS, 0) == 0.0
    assert bytes_until(ROWS, None) is None


def test_steps_count_valid_devices_and_the_server() -> None:
    # Round 1: two valid devices (the rejected one trained nothing that counts), round 2 one,
    # round 3 none; the server trains every round.
    assert device_steps(ROWS, 4, server_train=True) == 4 * (3 + 2 + 1)
    assert device_steps(ROWS, 4, server_train=False) == 4 * (2 + 1)


def test_bytes_per_device_split_by_whether_the_emulator_travelled() -> None:
    out = per_device_bytes([{"rows": ROWS}])
    assert out["0.5"] == {"first_down": 900, "first_up": 10, "later_down": 100, "later_up": 10}
    assert out["0.75"] == {"later_down": 100, "later_up": 10}
    assert "0.25" not in out  # rejected: not a device's round


def test_round_overhead_by_hand() -> None:
    r1 = round_overhead(ROWS, workers=2)[0]
    assert r1["wall_s"] == pytest.approx(60.0)
    assert r1["local_train_s"] == pytest.approx((6 + 4) / 2)
    assert r1["client_handlers_s"] == pytest.approx((9 + 5 + 2) / 2)
    assert r1["exchange_s"] == pytest.approx(16.0)
    assert r1["transport_s"] == pytest.approx(16.0 - 8.0)
    assert r1["server_other_s"] == pytest.approx(3 + 5 + 1)
    assert r1["rest_s"] == pytest.approx(60 - 16 - 9 - 2 - 8)
    assert len(round_overhead(ROWS, 1)) == 3


def test_run_plan_covers_every_system_on_the_same_seeds() -> None:
    specs = plan_runs([7, 8], base="model=tiny_llama")
    systems = {(s.system, s.seed) for s in specs}
    for system in ("ppo", "greedy", "random", "fixed", "fed_ft"):
        assert {(system, 7), (system, 8)} <= systems
    assert [s.name for s in specs if s.ray] == ["fixed-7"]
    assert all(s.overrides.startswith("model=tiny_llama") for s in specs)
    assert all("rounds=1" in s.overrides for s in specs if s.system == "fed_ft")


def test_markdown_table() -> None:
    assert table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_transfer_ratios_by_hand() -> None:
    from bench.transfer import markdown, ratios

    def row(ppl, bleu=None, share=None):
        p = {"ppl": ppl, "ppl_ci": [ppl - 1, ppl + 1]}
        if bleu is not None:
            p |= {"bleu": bleu, "bleu_ci": [bleu - 2, bleu + 2]}
        s = {} if share is None else {"device_layers_share": share, "bytes_total": 2e6}
        return {"test": {"plugin": p}, "summary": s}

    rows = {
        "base": row(20.0, 5.0),
        "case3": row(5.0, 50.0, 1.0),
        "region": row(6.0, 45.0, 1.0),
        "undistilled": row(15.0, 10.0, 0.47),
        "fedpeat": row(8.0, 40.0, 0.47),
        "server": row(18.0, 8.0),
        "centralised": row(6.0, 46.0),
    }
    # BLEU 40 / 50 = 0.80; ppl reduction (20 - 8) / (20 - 5) = 0.80
    assert ratios(rows) == [
        "- FedPEAT BLEU / case-3 BLEU: 0.80 (target 0.90)",
        "- FedPEAT perplexity reduction / case 3's: 0.80 (target 0.80)",
    ]
    # The longer row, where run, is reported beside: 45 / 50 = 0.90; (20 - 6.5) / 15 = 0.90.
    assert ratios(rows | {"fedpeat_9_rounds": row(6.5, 45.0, 0.47)})[2:] == [
        "- FedPEAT, 9 rounds, BLEU / case-3 BLEU: 0.90 (target 0.90)",
        "- FedPEAT, 9 rounds, perplexity reduction / case 3's: 0.90 (target 0.80)",
    ]
    text = markdown({"machine": "m", "rounds": 3, "data": {"e2e": rows}})
    assert "| fedpeat | 8.00 [7.00, 9.00] | 40.00 [38.00, 42.00] | - | 0.47 |" in text


def test_default_run_record_keeps_rounds_test_and_summary(tmp_path) -> None:
    import json

    from bench.default_run import record

    rows = [
        {"round": 0, "plugin_ppl": 120.0, "emulator_ppl": None, "task": {"bleu": 1.0}},
        {"round": 1, "plugin_ppl": 90.0, "emulator_ppl": 140.0, "bytes_down": 7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {"final_plugin_ppl": 90.0, "run_dir": "/somewhere", "test_plugin_ppl": 88.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "test.json").write_text(json.dumps({"plugin": {"ppl": 88.0}}))
    out = record(tmp_path, 431.0)
    assert out["total_s"] == 431.0 and out["overrides"] == ""
    # Headline fields only: a machine path (run_dir) never reaches the committed file.
    assert out["summary"] == {"final_plugin_ppl": 90.0, "test_plugin_ppl": 88.0}
    assert out["test"] == {"plugin": {"ppl": 88.0}}
    assert [r["plugin_ppl"] for r in out["rounds"]] == [120.0, 90.0]
    assert out["rounds"][1]["bytes_down"] == 7 and out["rounds"][0]["bytes_down"] is None
    assert "task" not in out["rounds"][0]


def test_aggregation_interval_and_table_by_hand() -> None:
    from bench.aggregation import markdown, summarise
    from bench.common import interval

    # Mean 2, sample std 1, t(0.975, 2) = 4.303: 2 +- 4.303 / sqrt(3) = 2 +- 2.4843.
    mean, lo, hi = interval([1.0, 2.0, 3.0])
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - 2.48434, 2.0 + 2.48434), abs=1e-4)
    assert interval([5.0])[0] == 5.0

    def run(test: float) -> dict:
        dev = {"status": "ok"}
        rows = [{}, {"truncation_error": 0.5, "devices": [dev, dev]}]
        summary = {
            "test_plugin_ppl": test,
            "test_plugin_ppl_ci": [test - 1, test + 1],
            "final_plugin_ppl": test + 3,
            "bytes_total": 2e6,
            "test_base_ppl": 100.0,
        }
        return {"summary": summary, "rows": rows}

    rules = summarise({"exact": {1: run(50.0), 2: run(52.0)}, "stack": {1: run(55.0)}})
    assert rules["exact"]["test_ppl"]["mean"] == 51.0
    assert rules["exact"]["seeds"][1]["trained"] == 2
    assert rules["exact"]["seeds"][2]["mb_sent"] == 2.0
    text = markdown({"machine": "m", "seeds": [1, 2], "rules": rules})
    assert "| exact | 51.00 [" in text and "50.00 [49.00, 51.00]; 52.00" in text
    assert "exact - stack: -4.00 test ppl" in text


def test_fleet_rows_read_what_the_policy_chose() -> None:
    from bench.fleets import describe, markdown

    ok = {"status": "ok", "rank": 16, "batch": 4, "bits": 8}
    run = {
        "rows": [
            {"round": 0, "plugin_ppl": 120.0},
            {
                "round": 1,
                "plugin_ppl": 100.0,
                "decided": "ppo-greedy",
                "devices": [
                    {**ok, "level": 0.2},
                    {**ok, "level": 0.2, "bits": 4},
                    {"status": "skipped", "level": None},
                ],
            },
        ],
        "summary": {
            "test_base_ppl": 110.0,
            "test_plugin_ppl": 90.0,
            "modelled_latency_total_s": 42.4,
            "bytes_total": 3 * 2**20,
            "wall_s": 10.0,
        },
    }
    row = describe(run, {"plugin": {"ppl_ci": [80.0, 99.0]}})
    assert row["rounds"] == [
        {
            "round": 1,
            "devices": 2,
            "levels": {"0.2": 2},
            "plans": ["r16 b4 4-bit", "r16 b4 8-bit"],
            "decided": "ppo-greedy",
        }
    ]
    assert row["val_ppl"] == [120.0, 100.0] and row["mb_sent"] == 3.0
    text = markdown({"rows": {"fleet-3": {"devices": 3, "levels_list": "[0.4]", **row}}}, "m")
    chosen = "| 2 x 0.2 | r16 b4 4-bit, r16 b4 8-bit | 120.00 -> 100.00 |"
    assert f"| fleet-3 | 3 | [0.4] {chosen}" in text
    assert "110.00 -> 90.00 [80.00, 99.00] | 42 | 3.0 |" in text


def test_control_figures_intervals_and_verdict_by_hand() -> None:
    from bench.control import figures, markdown, summarise, verdict

    def run(ppls: list[float], latency: list[float], test: float) -> dict:
        rows = [
            {
                "round": i,
                "plugin_ppl": p,
                "latency_s": t,
                "bytes_down": 10e6 * i,
                "bytes_up": 1e6 * i,
                "devices": [{"status": "ok"}] * i,
            }
            for i, (p, t) in enumerate(zip(ppls, latency, strict=True))
        ]
        # The server's summary: the first crossing of 115 and its summed modelled latency.
        reached = next((i for i, p in enumerate(ppls) if p <= 115.0), None)
        summary = {
            "time_to_target_s": None if reached is None else sum(latency[: reached + 1]),
            "modelled_latency_total_s": sum(latency),
            "bytes_total": 1.0,
            "final_plugin_ppl": ppls[-1],
            "test_plugin_ppl": test,
            "zero_shot_ppl": ppls[0],
        }
        return {"rows": rows, "summary": summary}

    f = figures(run([125.0, 118.0, 110.0], [0.0, 40.0, 60.0], 70.0), 115.0)
    # Reached in round 2: 40 + 60 s; bytes of rounds 1 and 2: 11 MB + 22 MB.
    assert (f["round_reached"], f["time_to_target_s"], f["bytes_to_target"]) == (2, 100.0, 33e6)
    assert f["devices_per_round"] == [1, 2]
    assert figures(run([125.0, 120.0], [0.0, 5.0], 80.0), 115.0)["bytes_to_target"] is None

    ppo = {1: figures(run([125.0, 110.0], [0.0, 10.0], 70.0), 115.0)}
    ppo[2] = figures(run([125.0, 110.0], [0.0, 20.0], 72.0), 115.0)
    rnd = {1: figures(run([125.0, 110.0], [0.0, 30.0], 69.0), 115.0)}
    rnd[2] = figures(run([125.0, 110.0], [0.0, 40.0], 71.0), 115.0)
    never = {s: figures(run([125.0, 120.0], [0.0, 1.0], 90.0), 115.0) for s in (1, 2)}
    summary = summarise({"ppo": ppo, "random": rnd, "fixed": never})
    # PPO: mean 15 s, sample std 7.071, t(0.975, 1) = 12.706: 15 +- 12.706 * 7.071 / sqrt 2.
    assert summary["ppo"]["time_to_target_s"] == pytest.approx((15.0, 15.0 - 63.53, 15.0 + 63.53))
    # Random over PPO per seed: 3 and 2; the target reads the smaller.
    assert summary["random"]["time_over_ppo"] == pytest.approx([2.0, 3.0])
    assert summary["random"]["time_over_ppo_per_seed"] == pytest.approx([3.0, 2.0])
    assert summary["fixed"]["reached"] == 0 and summary["fixed"]["time_to_target_s"] is None
    v = verdict(summary)
    assert v["faster_than"] == {"random": True, "fixed": True} and v["faster_than_all"]
    assert v["random_1.2x"] and v["best_baseline_test"] == "random"
    # PPO's mean test 71 against random's 70 [57.3, 82.7]: inside the interval.
    assert v["final_within_best"]
    results = {
        "machine": "m",
        "seeds": [1, 2],
        "target_ppl": 115.0,
        "zero_shot_val_ppl": 125.0,
        "zero_shot_test_ppl": 100.0,
        "systems": summary,
        "verdict": v,
    }
    text = markdown(results)
    assert "| ppo | 2/2 | 15 [" in text and "| fixed | 0/2 | not reached |" in text
    assert "faster than every other system: met" in text and "2.00x: met" in text
    assert "| random | 2/2 | 35 [" in text and "| 2.0-3.0 |" in text
    # A slower PPO misses and the table names who beat it.
    slow = summarise({"ppo": rnd, "random": ppo})
    assert not verdict(slow)["faster_than_all"] and not verdict(slow)["random_1.2x"]


def test_deploy_private_summary_reads_each_partners_rounds() -> None:
    from bench.deploy_private import markdown, summarise

    dev = {"node": 7, "status": "ok", "examples": 40, "level": 0.2, "bits": 4, "rank": 16}
    rows = [
        {"round": 0, "plugin_ppl": 120.0, "bytes_down": 0, "bytes_up": 0},
        {
            "round": 1,
            "plugin_ppl": 100.0,
            "devices": [dev, {**dev, "node": 8, "examples": 30}],
            "bytes_down": 3 * 2**20,
            "bytes_up": 2**20,
            "profiles": {
                "7": {"data-size": 40, "private-data": True},
                "8": {"data-size": 30, "private-data": True},
            },
        },
    ]
    s = summarise(rows, 12.0)
    assert s["data_sizes"] == [30, 40] and s["private"] and s["rounds"][1]["mb"] == 4.0
    text = markdown({**s, "machine": "m", "rounds_run": 1, "status": "finished:completed"})
    assert "| 1 | 100.00 | ok (40 examples, keep 0.2, 4-bit); ok (30 examples" in text
    assert "[30, 40] (all private: True)" in text


def test_default_run_overhead_by_hand() -> None:
    from bench.default_run import overhead

    text, fig = overhead(ROWS, workers=2)
    r1, r2, r3 = fig["rounds"]
    # round 1: 60 s of wall over devices' (6 + 4) / 2 + the server's 5 s training + 8 s eval
    assert r1["ratio"] == pytest.approx(60 / (5 + 5 + 8)) and r1["server_train_s"] == 5.0
    # round 2: 30 s over 5 / 2 s of device training (no server figures recorded)
    assert r2["ratio"] == pytest.approx(30 / 2.5)
    assert r3["devices"] == 0  # nothing measured: no ratio, and it does not count
    assert fig["worst_later_round"] == pytest.approx(12.0) and not fig["met"]
    assert "| 1 | 2 | 60.0 | 5.0 | 5.0 | 8.0 | 3.33 |" in text


def test_a_bench_run_leaves_no_device_disks_behind(tmp_path, monkeypatch) -> None:
    """The devices' simulated disks (near 1 GB a run) go once the run ends, failed or not."""
    from pathlib import Path

    import bench.federated as fed

    monkeypatch.setattr(fed, "RUNS_DIR", tmp_path)
    seen: list[Path] = []

    def fake_run(spec, devices, run_dir, env) -> Path:
        disks = Path(env["FEDPEAT_DEVICE_CACHE_DIR"])
        (disks / "device-0").mkdir(parents=True)
        (disks / "device-0" / "emulator.safetensors").write_bytes(b"x" * 10)
        seen.append(disks)
        if spec.name == "fails":
            raise RuntimeError("the run failed")
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        return run_dir

    monkeypatch.setattr(fed, "_run", fake_run)
    out = fed.execute(fed.Spec("ok", "fixed", "", 42), 2, reuse=False)
    assert (out / "summary.json").is_file() and seen[0].parent == tmp_path
    assert not seen[0].exists()
    with pytest.raises(RuntimeError, match="failed"):
        fed.execute(fed.Spec("fails", "fixed", "", 42), 2, reuse=False)
    assert not seen[1].exists()
