"""The sweep's expansion and its comparison table (runs themselves are covered elsewhere)."""

from __future__ import annotations

from fedpeat.cli.sweep import comparison_rows, expand, markdown


def test_sweep_expands_every_combination_in_hydra_grammar() -> None:
    assert expand("controller=fixed,ppo rounds=5 seed=1,2") == [
        ["controller=fixed", "rounds=5", "seed=1"],
        ["controller=fixed", "rounds=5", "seed=2"],
        ["controller=ppo", "rounds=5", "seed=1"],
        ["controller=ppo", "rounds=5", "seed=2"],
    ]
    assert expand("seed=range(1,3)") == [["seed=1"], ["seed=2"]]


def test_comparison_table_has_a_row_per_run_and_says_never() -> None:
    runs = [
        {
            "label": "controller=ppo",
            "status": "completed",
            "run_dir": "a",
            "summary": {
                "final_plugin_ppl": 99.5,
                "time_to_target_s": 120.0,
                "target_ppl": 105.0,
                "modelled_latency_total_s": 300.0,
                "bytes_total": 2**20 * 3,
                "reward_total": -1.5,
                "wall_s": 10.0,
            },
        },
        {
            "label": "controller=fixed",
            "status": "completed",
            "run_dir": "b",
            "summary": {
                "final_plugin_ppl": 107.0,
                "time_to_target_s": None,
                "target_ppl": 105.0,
                "modelled_latency_total_s": 900.0,
                "bytes_total": 2**20,
                "reward_total": -4.0,
                "wall_s": 10.0,
            },
        },
        {"label": "controller=random", "status": "failed", "run_dir": None, "summary": None},
    ]
    md = markdown(comparison_rows(runs)).splitlines()
    assert len(md) == 5 and "time to ppl 105" in md[0]
    assert md[2].startswith("| controller=ppo | completed | 99.50 | 120 | 300 | 3.0 | -1.500 |")
    assert "| never |" in md[3]
    assert md[4].startswith("| controller=random | failed | - | - |")
