"""Aggregation rules on the heterogeneous fleet: exact (FlexLoRA-style) against the two
heterogeneous-rank baselines, fedavg without zero dilution and FLoRA-style stacking.

Every run is `experiment=fedpipe` (FedPipe-planned ranks 2-16, batches, bit-widths and modules
on the tiered devices) with the server's own training off, so the plug-in's gain is the
devices' and the rule is all that differs; one run per rule and seed. The stacking row's global
rank is 288 (3 rounds x 6 devices x rank 16), so its stack is never re-factorised (FLoRA keeps
every block); the others keep the experiment's rank 64. The importance-chosen matrices do not
depend on the global rank (the budget is a share of all candidates' parameters at that rank).

Columns, per rule: test plug-in perplexity (mean over seeds, t-based 95% interval, and each
seed's bootstrap interval), validation perplexity after the last round, MB sent in all, the
largest truncation error. Decisions use validation; the test split is reported.
Writes bench/results/aggregation.{md,json}; runs go to runs/bench/ (`--reuse` keeps them).

    python -m bench.aggregation [--seeds 42,43,44,45,46] [--reuse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import interval, machine, write_json, write_md
from bench.federated import Spec, execute, load_run

BASE = "experiment=fedpipe strategy.server_train=false"
RULES = {
    "exact": "strategy.aggregation=exact",
    "fedavg": "strategy.aggregation=fedavg",
    "stack": "strategy.aggregation=stack planner.server_rank=288",
}
DEVICES = 6


def summarise(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per rule: the test perplexity over seeds (mean, interval), and each seed's figures."""
    out: dict[str, Any] = {}
    for rule, by_seed in runs.items():
        tests = [r["summary"]["test_plugin_ppl"] for r in by_seed.values()]
        mean, lo, hi = interval(tests)
        out[rule] = {
            "overrides": f"{BASE} {RULES[rule]}",
            "test_ppl": {"mean": mean, "ci95": [lo, hi], "n": len(tests)},
            "seeds": {
                seed: {
                    "test_ppl": r["summary"]["test_plugin_ppl"],
                    "test_ppl_ci": r["summary"].get("test_plugin_ppl_ci"),
                    "val_ppl": r["summary"]["final_plugin_ppl"],
                    "mb_sent": r["summary"]["bytes_total"] / 1e6,
                    "truncation_error": max(
                        (x["truncation_error"] or 0.0 for x in r["rows"][1:]), default=0.0
                    ),
                    "trained": sum(
                        d["status"] == "ok" for x in r["rows"][1:] for d in x["devices"]
                    ),
                }
                for seed, r in by_seed.items()
            },
            "zero_shot_test_ppl": next(iter(by_seed.values()))["summary"]["test_base_ppl"],
        }
    return out


def markdown(results: dict[str, Any]) -> str:
    rules = results["rules"]
    lines = [
        "# Aggregation rules on the heterogeneous fleet",
        "",
        f"`python -m bench.aggregation --seeds {','.join(map(str, results['seeds']))}` on "
        f"{results['machine']}. `{BASE}` plus the rule's overrides, {DEVICES} devices, 3 rounds; "
        "test split (mean over seeds with a t-based 95% interval; per seed its bootstrap "
        "interval over test samples).",
        "",
        "| rule | test ppl, mean [95% CI] | per seed: test ppl [bootstrap CI] | val ppl | "
        "MB sent | max truncation error | device updates |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, r in rules.items():
        t = r["test_ppl"]
        seeds = r["seeds"].values()
        per_seed = "; ".join(
            f"{s['test_ppl']:.2f} [{s['test_ppl_ci'][0]:.2f}, {s['test_ppl_ci'][1]:.2f}]"
            if s.get("test_ppl_ci")
            else f"{s['test_ppl']:.2f}"
            for s in seeds
        )
        lines.append(
            f"| {rule} | {t['mean']:.2f} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] | {per_seed} | "
            + " | ".join(
                "/".join(f"{s[k]:{fmt}}" for s in seeds)
                for k, fmt in (
                    ("val_ppl", ".2f"),
                    ("mb_sent", ".1f"),
                    ("truncation_error", ".3g"),
                    ("trained", "d"),
                )
            )
            + " |"
        )
    first = next(iter(rules.values()))
    lines += ["", f"Zero-shot test perplexity: {first['zero_shot_test_ppl']:.2f}."]
    if "exact" in rules:
        e = rules["exact"]["test_ppl"]
        for other in (o for o in rules if o != "exact"):
            m = rules[other]["test_ppl"]
            lines.append(
                f"- exact - {other}: {e['mean'] - m['mean']:+.2f} test ppl (negative: exact lower)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,43,44,45,46")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    # Seed by seed, every rule: a partial run still compares the rules on the same seeds.
    for seed in seeds:
        for rule in args.rules.split(","):
            spec = Spec(
                f"aggregation-{rule}-{seed}", rule, f"{BASE} {RULES[rule]} seed={seed}", seed
            )
            run_dir: Path = execute(spec, DEVICES, args.reuse)
            runs.setdefault(rule, {})[seed] = load_run(run_dir)
            s = runs[rule][seed]["summary"]
            print(f"{rule} seed {seed}: test ppl {s['test_plugin_ppl']:.2f}", flush=True)
    results: dict[str, Any] = {"machine": machine(), "seeds": seeds, "rules": summarise(runs)}
    write_json("aggregation.json", results)
    write_md("aggregation.md", markdown(results))
    print(json.dumps({r: v["test_ppl"] for r, v in results["rules"].items()}, indent=1))


if __name__ == "__main__":
    main()
