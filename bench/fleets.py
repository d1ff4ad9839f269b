"""One shipped policy on fleets of several sizes and two level lists, on the default model.

The default experiment (the shipped PPO checkpoint, the FedPipe planner, quantized emulators)
run unchanged with 3, 6 and 20 simulated devices (device i takes profile i mod 6, as in
simulation) and with 6 devices on a second level list (`emulator.levels=[0.3,0.2]`). No row
re-trains the policy: the checkpoint scores every (device, option) pair with shared weights,
so it runs any fleet and level list. Per row: the devices and levels it chose each round, the
plans (rank, batch, bits), the plug-in perplexity on validation and on test (bootstrap 95%
interval), the modelled time and the bytes sent. One seed per row: this table shows that the
checkpoint runs and what it chose; how well the controllers do is compared over seeds in
`bench/results/control.md`.

    python -m bench.fleets [--reuse]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json, write_md
from bench.federated import Spec, execute, load_run

ROWS = {
    "fleet-3": (3, ""),
    "fleet-6": (6, ""),
    "fleet-20": (20, ""),
    "levels-0.3-0.2": (6, "emulator.levels=[0.3,0.2]"),
}


def describe(run: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """What the policy chose and what it gave, from a run's metrics, summary and test report."""
    rows = [r for r in run["rows"] if r["round"] > 0]
    chosen = []
    for r in rows:
        ok = [d for d in r.get("devices") or [] if d.get("status") == "ok"]
        levels = Counter(f"{d['level']:g}" for d in ok)
        plans = sorted({f"r{d['rank']} b{d['batch']} {d['bits']}-bit" for d in ok})
        chosen.append(
            {
                "round": r["round"],
                "devices": len(ok),
                "levels": dict(levels),
                "plans": plans,
                "decided": r.get("decided"),
            }
        )
    s = run["summary"]
    return {
        "rounds": chosen,
        "val_ppl": [r["plugin_ppl"] for r in run["rows"]],
        "test_base_ppl": s.get("test_base_ppl"),
        "test_plugin_ppl": s.get("test_plugin_ppl"),
        "test_plugin_ci": test["plugin"]["ppl_ci"],
        "modelled_s": s.get("modelled_latency_total_s"),
        "mb_sent": s.get("bytes_total", 0) / 2**20,
        "wall_s": s.get("wall_s"),
    }


def markdown(results: dict[str, Any], here: str) -> str:
    lines = [
        "# One shipped policy, any fleet",
        "",
        f"`python -m bench.fleets` on {here}: the default experiment (the shipped PPO policy, "
        "the FedPipe planner, 4/8-bit emulators), 3 rounds, seed 42, unchanged but for the "
        "fleet size or the level list. Chosen: devices x level per round (the same policy "
        "file every row).",
        "",
    ]
    body = []
    for name, r in results["rows"].items():
        per_round = "; ".join(
            ", ".join(f"{n} x {lv}" for lv, n in c["levels"].items()) or "none" for c in r["rounds"]
        )
        plans = sorted({p for c in r["rounds"] for p in c["plans"]})
        ci = r["test_plugin_ci"] or [float("nan")] * 2
        body.append(
            [
                name,
                r["devices"],
                r["levels_list"],
                per_round,
                ", ".join(plans),
                " -> ".join(f"{v:.2f}" for v in r["val_ppl"]),
                f"{r['test_base_ppl']:.2f} -> {r['test_plugin_ppl']:.2f} "
                f"[{ci[0]:.2f}, {ci[1]:.2f}]",
                f"{r['modelled_s']:.0f}",
                f"{r['mb_sent']:.1f}",
            ]
        )
    header = ["row", "devices", "levels", "chosen per round", "plans", "validation ppl"]
    header += ["test ppl", "modelled s", "MB sent"]
    return "\n".join(lines) + "\n" + table(header, body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reuse", action="store_true", help="keep completed runs")
    parser.add_argument("--rows", default="", help="comma-separated rows (default: all)")
    args = parser.parse_args()
    names = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows are {list(ROWS)}")
    out: dict[str, Any] = {"machine": machine(), "rows": {}}
    for name in names:
        devices, extra = ROWS[name]
        overrides = f"seed=42 {extra}".strip()
        run_dir: Path = execute(Spec(f"fleets-{name}", name, overrides, 42), devices, args.reuse)
        row = describe(load_run(run_dir), json.loads((run_dir / "test.json").read_text()))
        levels = extra.split("=", 1)[1] if extra else "[0.4,0.3,0.2]"
        out["rows"][name] = {"devices": devices, "levels_list": levels, **row}
        print(f"{name}: {row['val_ppl'][-1]:.2f} validation, {row['rounds']}", flush=True)
    write_json("fleets.json", out)
    write_md("fleets.md", markdown(out, out["machine"]))


if __name__ == "__main__":
    main()
