"""The default run's record: turns a finished `make run` (runs/latest by default) into
bench/results/default_run.json, per round and on the test split, so the README's figures for the
default experiment name a committed file.

    /usr/bin/time -f %e make run        # on a fresh clone: the total, install included
    python -m bench.default_run --total-s <that figure> [--run runs/latest]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import machine, write_json

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/latest"))
    parser.add_argument(
        "--total-s", type=float, default=None, help="measured seconds of the whole make run"
    )
    args = parser.parse_args()
    if not (args.run / "metrics.jsonl").is_file():
        raise SystemExit(f"--run {args.run}: no metrics.jsonl there (is it a finished run?)")
    out = write_json("default_run.json", record(args.run.resolve(), args.total_s))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
