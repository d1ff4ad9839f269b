"""Every benchmark in one run: `python -m bench` (make bench). Results go to bench/results/.

Each stage runs in a process of its own (memory readings need a fresh address space). Stages and
their seconds are written to bench/results/bench_run.json.

    python -m bench [--seeds 42,43] [--only memory,federated] [--reuse]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS, machine, write_json


def stages(seeds: str, reuse: bool) -> dict[str, list[list[str]]]:
    py = [sys.executable, "-m"]
    # --pretrain: the PPO policy the ppo runs start from is trained (and compared on the
    # edge-system environment) first, beside the other runs.
    federated = [*py, "bench.federated", "--seeds", seeds, "--pretrain"]
    federated += ["--reuse"] if reuse else []
    return {
        "model_load": [[*py, "bench.model_load"]],
        "retention": [[*py, "fedpeat.cli.retention", "--out", str(RESULTS)]],
        "memory": [[*py, "bench.client_memory"]],
        # The server's peak over a run's work: the default model and a 1.3B random Llama.
        "server_memory": [[*py, "bench.server_memory"]],
        # The default experiment under flwr run: its record and the round overhead table.
        "default_run": [[*py, "bench.default_run", "--launch"]],
        "federated": [federated],
        "merged_forward": [[*py, "bench.merged_forward"]],
        "round_files": [[*py, "bench.round_files"]],
        # E2E rows need ../shared/data/e2e (skipped with a message where it is absent).
        "transfer": [[*py, "bench.transfer", *(["--reuse"] if reuse else [])]],
        "aggregation": [[*py, "bench.aggregation", *(["--reuse"] if reuse else [])]],
        # The shipped policy unchanged on 3, 6 and 20 devices and a second level list.
        "fleets": [[*py, "bench.fleets", *(["--reuse"] if reuse else [])]],
        # Three partners on their own private files, TLS and node authentication, 2 rounds.
        "deploy_private": [[*py, "bench.deploy_private"]],
        # Every controller on the whole system over 5 seeds (time to target, final test ppl).
        "control": [[*py, "bench.control", *(["--reuse"] if reuse else [])]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,43", help="seeds of the federated runs")
    parser.add_argument("--only", default="", help="comma-separated stages")
    parser.add_argument("--reuse", action="store_true", help="keep completed federated runs")
    args = parser.parse_args()
    plan = stages(args.seeds, args.reuse)
    chosen = args.only.split(",") if args.only else list(plan)
    unknown = [s for s in chosen if s not in plan]
    if unknown:
        print(f"--only: unknown stage(s) {unknown}; stages are {list(plan)}", file=sys.stderr)
        return 2
    began, seconds = time.perf_counter(), {}
    for i, name in enumerate(chosen, 1):
        print(f"[bench {i}/{len(chosen)}] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        for cmd in plan[name]:
            if subprocess.run(cmd).returncode != 0:
                print(f"[bench] {name} failed: {' '.join(cmd[2:])}", file=sys.stderr)
                return 1
        seconds[name] = time.perf_counter() - t
        print(
            f"[bench {i}/{len(chosen)}] {name} done in {seconds[name]:.0f}s "
            f"(total {time.perf_counter() - began:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    if not args.only:
        total = time.perf_counter() - began
        write_json(
            "bench_run.json",
            {"machine": machine(), "seeds": args.seeds, "stage_s": seconds, "total_s": total},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
