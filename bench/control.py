"""The controllers compared as a user would run them: the whole system (the default experiment:
FedPipe-planned, 4/8-bit emulators, a deadline and an upload cap from the fleet) with each way
of choosing the round's devices and emulators, over seeds, on the default model.

  ppo           the shipped policy (`experiment=system` as it is: `make run`)
  fixed         every device at one level (`controller.fixed_level`)
  random        devices and levels at random
  greedy        the fastest share of devices at the largest level each can hold
  oort          Oort-style: statistical utility x system speed, with exploration
  planner-all   no controller: every device, each at its largest fitting level, planned

Per system and seed: the modelled seconds until the validation plug-in perplexity first reaches
`controller.target_ppl` (the rounds' modelled latency: transmission and device compute under
each device's own plan, plus the server's training and evaluation), the bytes sent until then,
and the final test plug-in perplexity. Across seeds: the mean and a t-based 95% interval of
each, and per seed the ratio of every system's time to PPO's (the target on the least
favourable seed). Decisions (the target) use the validation split; the final figure is the
test split's.
Writes bench/results/control.{md,json}; runs go to runs/bench/ (`--reuse` keeps them).

    python -m bench.control [--seeds 42,43,44,45,46] [--systems ppo,random] [--reuse]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import interval, machine, write_json, write_md
from bench.federated import Spec, execute, load_run
from bench.federated_report import bytes_until, reached_round

SYSTEMS = {
    "ppo": "",
    "fixed": "controller=fixed",
    "random": "controller=random",
    "greedy": "controller=greedy",
    "oort": "controller=oort",
    "planner-all": "controller=none",
}
DEVICES = 6


def figures(run: dict[str, Any], target: float) -> dict[str, Any]:
    """One run's time and bytes to the target (None where it never reaches it) and its final
    figures."""
    rows, s = run["rows"], run["summary"]
    reached = reached_round(rows, target)
    chosen = [
        sum(d.get("status") == "ok" for d in r.get("devices") or []) for r in rows if r["round"]
    ]
    return {
        "time_to_target_s": s["time_to_target_s"],
        "round_reached": reached,
        "bytes_to_target": bytes_until(rows, reached),
        "modelled_s": s.get("modelled_latency_total_s"),
        "bytes_total": s.get("bytes_total"),
        "val_ppl": s["final_plugin_ppl"],
        "test_ppl": s["test_plugin_ppl"],
        "test_ppl_ci": s.get("test_plugin_ppl_ci"),
        "devices_per_round": chosen,
        "wall_s": s.get("wall_s"),
    }


def summarise(per_seed: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per system: the interval of each figure over the seeds that reached the target (time,
    bytes) or over every seed (final figures); per seed, each system's time over PPO's."""
    out: dict[str, Any] = {}
    for system, seeds in per_seed.items():
        reached = [f for f in seeds.values() if f["time_to_target_s"] is not None]
        entry: dict[str, Any] = {"seeds": seeds, "reached": len(reached), "n": len(seeds)}
        for key in ("time_to_target_s", "bytes_to_target"):
            entry[key] = interval([f[key] for f in reached]) if reached else None
        for key in ("test_ppl", "val_ppl", "modelled_s"):
            entry[key] = interval([f[key] for f in seeds.values()])
        if system != "ppo" and "ppo" in per_seed:
            ratios = [
                f["time_to_target_s"] / p["time_to_target_s"]
                for seed, f in seeds.items()
                if (p := per_seed["ppo"].get(seed)) is not None
                and f["time_to_target_s"] is not None
                and p["time_to_target_s"]
            ]
            # Per seed: a mean of ratios is ruled by the seed where PPO sent no device, so the
            # range (and the target on its smallest) says more than an interval.
            entry["time_over_ppo"] = [min(ratios), max(ratios)] if ratios else None
            entry["time_over_ppo_per_seed"] = ratios
        out[system] = entry
    return out


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's target, part by part: PPO's mean time to target below every other system's,
    at least 1.2x below random's (mean of the per-seed ratios), and its mean final test
    perplexity inside the best baseline's interval or below it."""
    ppo = summary["ppo"]
    others = {s: v for s, v in summary.items() if s != "ppo"}
    t_ppo = ppo["time_to_target_s"]
    faster = {
        s: t_ppo is not None
        and ppo["reached"] == ppo["n"]
        and (v["time_to_target_s"] is None or t_ppo[0] < v["time_to_target_s"][0])
        for s, v in others.items()
    }
    rand = others.get("random", {}).get("time_over_ppo")  # [smallest, largest] per seed
    best = min(others, key=lambda s: others[s]["test_ppl"][0]) if others else None
    hi = others[best]["test_ppl"][2] if best else float("inf")
    return {
        "faster_than": faster,
        "faster_than_all": all(faster.values()),
        "random_over_ppo": rand[0] if rand else None,  # on its least favourable seed
        "random_1.2x": bool(rand and rand[0] >= 1.2),
        "best_baseline_test": best,
        "final_within_best": ppo["test_ppl"][0] <= hi,
    }


def _ci(v: tuple[float, float, float] | list[float] | None, fmt: str, scale: float = 1.0) -> str:
    if v is None:
        return "not reached"
    mean, lo, hi = (x / scale for x in v)
    if lo != lo:  # a single value: no interval
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _range(v: list[float] | None) -> str:
    return "-" if v is None else f"{v[0]:.1f}-{v[1]:.1f}"


def markdown(results: dict[str, Any]) -> str:
    summary, v = results["systems"], results["verdict"]
    lines = [
        "# The controllers on the whole system",
        "",
        f"`python -m bench.control --seeds {','.join(map(str, results['seeds']))}` on "
        f"{results['machine']}. The default experiment (`experiment=system`: FedPipe planner, "
        f"4/8-bit emulators, fleet-derived deadline and upload cap, {DEVICES} devices, 3 "
        "rounds, the server training too) with each controller; mean over seeds with a "
        "t-based 95% interval. Time to target: modelled seconds (transmission, each device's "
        "compute under its own plan, the server's training and evaluation) until the "
        f"validation plug-in perplexity first reaches {results['target_ppl']:g} (from "
        f"{results['zero_shot_val_ppl']:.2f}); bytes until then; final: test plug-in "
        f"perplexity after the last round (zero-shot {results['zero_shot_test_ppl']:.2f}).",
        "",
        "| system | reached | modelled s to target | x PPO's time (seeds' range) | MB to target | "
        "modelled s, 3 rounds | final test ppl | final val ppl | devices per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, e in summary.items():
        per_round = "; ".join(
            "/".join(str(n) for n in f["devices_per_round"]) for f in e["seeds"].values()
        )
        lines.append(
            f"| {system} | {e['reached']}/{e['n']} | {_ci(e['time_to_target_s'], '.0f')} | "
            f"{'1' if system == 'ppo' else _range(e.get('time_over_ppo'))} | "
            f"{_ci(e['bytes_to_target'], '.1f', 1e6)} | {_ci(e['modelled_s'], '.0f')} | "
            f"{_ci(e['test_ppl'], '.2f')} | {_ci(e['val_ppl'], '.2f')} | {per_round} |"
        )
    slower = [s for s, ok in v["faster_than"].items() if not ok]
    lines += [
        "",
        "Target (PPO faster to the target than every other system, at least 1.2x faster than "
        "random, final test perplexity no worse than the best baseline's interval):",
        f"- faster than every other system: {'met' if v['faster_than_all'] else 'missed'}"
        + (f" (not faster than {', '.join(slower)})" if slower else ""),
        f"- random's time over PPO's on its least favourable seed: "
        f"{'n/a' if v['random_over_ppo'] is None else format(v['random_over_ppo'], '.2f')}x: "
        f"{'met' if v['random_1.2x'] else 'missed'}",
        f"- final test perplexity against the best baseline ({v['best_baseline_test']}): "
        f"{'met' if v['final_within_best'] else 'missed'}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,43,44,45,46")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--reuse", action="store_true", help="keep completed runs")
    args = parser.parse_args()
    from fedpeat.config import compose

    seeds = [int(s) for s in args.seeds.split(",")]
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; systems are {list(SYSTEMS)}")
    for system in systems:  # every configuration composes before anything runs
        compose(SYSTEMS[system])
    target = compose("").controller.target_ppl
    per_seed: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in systems}
    first: dict[str, Any] = {}
    # Seed by seed, every system: a partial run still compares the systems on the same seeds.
    for seed in seeds:
        for system in systems:
            overrides = f"{SYSTEMS[system]} seed={seed}".strip()
            spec = Spec(f"control-{system}-{seed}", system, overrides, seed)
            run_dir: Path = execute(spec, DEVICES, args.reuse)
            run = load_run(run_dir)
            first = first or run["summary"]
            per_seed[system][seed] = figures(run, target)
            f = per_seed[system][seed]
            print(
                f"{system} seed {seed}: to target {f['time_to_target_s']} s, test "
                f"{f['test_ppl']:.2f}, devices {f['devices_per_round']}",
                flush=True,
            )
    summary = summarise(per_seed)
    results: dict[str, Any] = {
        "machine": machine(),
        "seeds": seeds,
        "target_ppl": target,
        "zero_shot_val_ppl": first["zero_shot_ppl"],
        "zero_shot_test_ppl": first["test_base_ppl"],
        "systems": summary,
    }
    results["verdict"] = verdict(summary) if "ppo" in summary and len(summary) > 1 else {}
    write_json("control.json", results)
    if results["verdict"]:
        write_md("control.md", markdown(results))


if __name__ == "__main__":
    main()
