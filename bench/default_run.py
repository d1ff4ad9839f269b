"""The default run's record: turns a finished `make run` (runs/latest by default) into
bench/results/default_run.json, per round and on the test split, so the README's figures for the
default experiment name a committed file; and where each round's wall time went under
`flwr run` (bench/results/overhead.md): the devices' training per worker, the server's own
training and its evaluation against the round's wall time.

    /usr/bin/time -f %e make run        # on a fresh clone: the total, install included
    python -m bench.default_run --total-s <that figure> [--run runs/latest]
    python -m bench.default_run --launch  # runs the default experiment itself (make bench)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json, write_md
from bench.federated_report import round_overhead

DEVICES = 6
TARGET = 1.3  # round wall time over (training per worker + the server's evaluation), rounds 2+

ROUND_FIELDS = (
    "round",
    "plugin_ppl",
    "emulator_ppl",
    "gap",
    "num_clients",
    "skipped",
    "emulator_bytes",
    "bytes_down",
    "bytes_up",
    "latency_s",
    "elapsed_s",
)
SUMMARY_FIELDS = (
    "zero_shot_ppl",
    "final_plugin_ppl",
    "best_plugin_ppl",
    "best_round",
    "test_base_ppl",
    "test_plugin_ppl",
    "test_plugin_ppl_ci",
    "test_emulator_ppl",
    "wall_s",
    "bytes_total",
    "device_layers_share",
    "device_params_share",
)


def record(run: Path, total_s: float | None) -> dict[str, Any]:
    """What the committed file holds: per-round figures, the test report, the summary's
    headline fields, and the measured total (fresh clone, install included) when given."""
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "command": "make run",
        "what": "the default experiment under flwr run (6 simulated devices, default seeds)",
        "machine": machine(),
        "total_s": total_s,
        "overrides": (run / "overrides.txt").read_text().strip()
        if (run / "overrides.txt").is_file()
        else "",
        "summary": {k: summary[k] for k in SUMMARY_FIELDS if k in summary},
        "test": json.loads((run / "test.json").read_text()),
        "rounds": [{k: r.get(k) for k in ROUND_FIELDS} for r in rounds],
    }


def overhead(rows: list[dict[str, Any]], workers: int) -> tuple[str, dict[str, Any]]:
    """The overhead table of a run's rounds and its target figure (rounds 2+). Training is the
    round's: the devices' local training divided by the parallel workers plus the server's own
    training step (it trains as one more participant); evaluation is the server's."""
    out, lines = [], []
    by_round = {r["round"]: r for r in rows}
    for rr in round_overhead(rows, workers):
        row = by_round[rr["round"]]
        server_train = float((row.get("timing") or {}).get("server_train", 0.0))
        busy = rr["local_train_s"] + server_train + rr["server_eval_s"]
        ratio = rr["wall_s"] / busy if busy else float("nan")
        out.append({**rr, "server_train_s": server_train, "ratio": ratio})
        lines.append(
            [
                rr["round"],
                rr["devices"],
                f"{rr['wall_s']:.1f}",
                f"{rr['local_train_s']:.1f}",
                f"{server_train:.1f}",
                f"{rr['server_eval_s']:.1f}",
                f"{ratio:.2f}",
                f"{rr['client_handlers_s']:.1f}",
                f"{rr['server_other_s'] - server_train:.1f}",
                f"{rr['profile_s']:.1f}",
                f"{rr['transport_s']:.1f} ({100 * rr['transport_s'] / rr['wall_s']:.0f}%)",
            ]
        )
    header = [
        "round",
        "devices",
        "round wall s",
        "device training / workers s",
        "server training s",
        "server eval s",
        "wall / (training + eval)",
        "device handlers / workers s",
        "server planning + aggregation s",
        "profile query s",
        "exchanges beyond device work s (share of wall)",
    ]
    later = [o["ratio"] for o in out if o["round"] >= 2 and math.isfinite(o["ratio"])]
    worst = max(later) if later else float("nan")
    return table(header, lines), {
        "rounds": out,
        "workers": workers,
        "worst_later_round": worst,
        "limit": TARGET,
        "met": bool(later) and worst <= TARGET,
    }


def launch(devices: int) -> tuple[Path, float]:
    """The default experiment under `flwr run`, as `make run` starts it (the venv exists)."""
    began = time.perf_counter()
    cmd = [sys.executable, "-m", "fedpeat.cli.launch", "--devices", str(devices)]
    if subprocess.run(cmd, env=os.environ).returncode != 0:
        raise SystemExit("the default experiment failed under flwr run")
    return Path("runs/latest").resolve(), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/latest"))
    parser.add_argument(
        "--launch", action="store_true", help="run the default experiment under flwr run first"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="devices training at once (default: one per core, at most the devices)",
    )
    parser.add_argument(
        "--total-s", type=float, default=None, help="measured seconds of the whole make run"
    )
    args = parser.parse_args()
    run, launched_s = args.run, None
    if args.launch:
        run, launched_s = launch(DEVICES)
    if not (run / "metrics.jsonl").is_file():
        raise SystemExit(f"--run {run}: no metrics.jsonl there (is it a finished run?)")
    rec = record(run.resolve(), args.total_s)
    rec["launch_s"] = launched_s
    workers = args.workers or min(DEVICES, os.cpu_count() or 1)
    text, figures = overhead(
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()], workers
    )
    rec["overhead"] = figures
    out = write_json("default_run.json", rec)
    verdict = "met" if figures["met"] else "missed"
    how = (
        "`python -m bench.default_run --launch`, as `make run` starts it"
        if args.launch
        else "a `make run` recorded by `python -m bench.default_run`"
    )
    write_md(
        "overhead.md",
        "\n".join(
            [
                "# Round overhead under `flwr run`",
                "",
                f"The default experiment ({how}) in Ray simulation on {rec['machine']}: "
                f"{DEVICES} devices, one CPU each, "
                f"{workers} training at once. Training is the round's: the devices' local "
                "training per worker plus the server's own training step; evaluation is the "
                "server's (plug-in and gap). The devices' evaluation of the adapter they received "
                "runs inside their train handler (one exchange a round), so it counts as "
                "overhead here.",
                "",
                text,
                "",
                f"Target: rounds 2+ at most {TARGET}x (training + evaluation): {verdict} "
                f"(worst {figures['worst_later_round']:.2f}x).",
            ]
        ),
    )
    print(f"wrote {out} and overhead.md")


if __name__ == "__main__":
    main()
