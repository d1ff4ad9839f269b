"""A Hydra sweep of federated runs, ending in one comparison table and one plot.

    python -m fedpeat.cli.sweep --overrides "controller=fixed,random,greedy,ppo"
    make sweep SWEEP="controller=fixed,random,greedy,ppo" OVERRIDES="rounds=5"

Sweep values use Hydra's override grammar (`key=a,b,c`, `range(...)`, `choice(...)`); every
combination runs once under the local simulation (`fedpeat.cli.launch`), then
`<output>/sweep-<time>/comparison.md|json|png` compare plug-in perplexity, modelled time to the
target, bytes and reward. Every run starts with empty device emulator caches (as a first run
does), so no run is spared the downloads an earlier one paid. A failed run is a row with its
status, not the end of the sweep.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeat.outputs import read_metrics, write_json_atomic


def expand(overrides: str) -> list[list[str]]:
    """Every combination of the sweep overrides, each with the plain ones (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(shlex.split(overrides))
    axes: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*axes)]


def _label(combo: Sequence[str], swept: Sequence[str]) -> str:
    return " ".join(c for c in combo if c.split("=", 1)[0] in swept) or "run"


def comparison_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run from its summary (missing figures stay None)."""
    rows = []
    for run in runs:
        s = run.get("summary") or {}
        rows.append(
            {
                "run": run["label"],
                "status": run["status"],
                "final_plugin_ppl": s.get("final_plugin_ppl"),
                "time_to_target_s": s.get("time_to_target_s"),
                "target_ppl": s.get("target_ppl"),
                "modelled_latency_total_s": s.get("modelled_latency_total_s"),
                "bytes_total": s.get("bytes_total"),
                "reward_total": s.get("reward_total"),
                "wall_s": s.get("wall_s"),
                "run_dir": run.get("run_dir"),
            }
        )
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    target = next((r["target_ppl"] for r in rows if r["target_ppl"] is not None), None)
    lines = [
        f"| run | status | final plug-in ppl | modelled time to ppl {_fmt(target, 'g')} (s) "
        "| modelled time, all rounds (s) | bytes (MB) | reward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mb = None if r["bytes_total"] is None else r["bytes_total"] / 2**20
        ttt = r["time_to_target_s"]
        lines.append(
            f"| {r['run']} | {r['status']} | {_fmt(r['final_plugin_ppl'], '.2f')} "
            f"| {'never' if ttt is None and r['status'] == 'completed' else _fmt(ttt, '.0f')} "
            f"| {_fmt(r['modelled_latency_total_s'], '.0f')} | {_fmt(mb, '.1f')} "
            f"| {_fmt(r['reward_total'], '.3f')} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, target: float | None) -> None:
    """Plug-in perplexity against cumulative modelled time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        if not run.get("run_dir") or not (Path(run["run_dir"]) / "metrics.jsonl").is_file():
            continue
        rows = read_metrics(Path(run["run_dir"]) / "metrics.jsonl")
        t, xs = 0.0, []
        for row in rows:
            t += float(row.get("latency_s") or 0.0)
            xs.append(t)
        ax.plot(xs, [r["plugin_ppl"] for r in rows], marker="o", label=run["label"])
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("modelled time (s): sum of round latencies")
    ax.set_ylabel("plug-in perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeat.cli.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--overrides", required=True, help="Hydra overrides with sweeps")
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)

    from fedpeat.cli.launch import launch
    from fedpeat.config import ConfigError, compose

    try:
        combos = expand(args.overrides)
        for combo in combos:  # every combination composes before anything runs
            compose(combo)
    except (ConfigError, ValueError) as err:
        print(f"[sweep] error: {err}", file=sys.stderr)
        return 2
    values: dict[str, set[str]] = {}
    for combo in combos:
        for item in combo:
            key, value = item.split("=", 1)
            values.setdefault(key, set()).add(value)
    swept = [k for k, v in values.items() if len(v) > 1]
    out = args.output_dir.resolve() / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    runs: list[dict[str, Any]] = []
    for i, combo in enumerate(combos, 1):
        label = _label(combo, swept)
        print(f"[sweep] {i}/{len(combos)}: {' '.join(combo)}", flush=True)
        # Fresh device disks per run: a run must not find the emulators an earlier run of the
        # sweep left on the devices (it would be charged no downloads).
        os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = str(out / f"devices-{i}")
        try:
            o = launch(args.devices, " ".join(combo), args.output_dir, stream=False)
            run = {
                "label": label,
                "status": "completed" if o.ok else o.status,
                "summary": o.summary,
                "run_dir": str(o.run_dir) if o.run_dir else None,
            }
        except Exception as err:  # one failed run is a row, not the end of the sweep
            run = {"label": label, "status": f"error: {err}", "summary": None, "run_dir": None}
        runs.append(run)
        rows = comparison_rows(runs)
        write_json_atomic(out / "comparison.json", rows)
        (out / "comparison.md").write_text(markdown(rows) + "\n")
    target = next((r["target_ppl"] for r in rows if r["target_ppl"] is not None), None)
    plot(runs, out / "comparison.png", target)
    print(markdown(rows))
    print(f"[sweep] comparison: {out}")
    return 0 if all(r["status"] == "completed" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
