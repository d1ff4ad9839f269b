"""Several simulated devices sharing one GPU through Ray's fractional GPUs, under `flwr run`.

Launches the app in local simulation (`fedpeat.cli.launch`, as `make run` does) with
`--gpus-per-device F` (Ray gives each ClientApp actor the fraction F of a GPU, so 1 / F devices
train on one GPU at once) and `train.device` set to where devices train, then reads the run's
metrics.jsonl:

  on the GPU    every device row that trained reports the CUDA device it used (`gpu`, -1 on a
                CPU): all of them must have trained where they were told
  concurrency   per round, the devices' train-handler seconds summed over the round's train
                exchange: above 1 when devices worked at the same time
  memory        each device's CUDA allocator peak (`peak_mem_mb`): all of them fit on one GPU

A dry run on a CPU (`--device cpu --gpus-per-device 0`) checks the same plumbing with -1.
Writes bench/results/ray_gpu.{json,md} (or --out).

    python -m bench.ray_gpu [--devices 4] [--gpus-per-device 0.25] [--overrides "..."]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json, write_md

DEFAULT_OVERRIDES = "experiment=tiny controller=none rounds=2"


def summarise(rows: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The per-round figures and the checks, from a run's metrics.jsonl rows."""
    rounds, gpus, bad = [], set(), []
    for r in rows:
        trained = [d for d in r.get("devices", []) if d.get("status") == "ok"]
        handler = sum(d.get("handler_s") or 0.0 for d in trained)
        exchange = (r.get("timing") or {}).get("train_exchange") or 0.0
        for d in trained:
            gpu = d.get("gpu")
            gpus.add(gpu)
            if (gpu is None or gpu < 0) if device == "cuda" else gpu != -1:
                bad.append({"round": r["round"], "node": d["node"], "gpu": gpu})
        rounds.append(
            {
                "round": r["round"],
                "trained": len(trained),
                "handler_s_sum": handler,
                "train_exchange_s": exchange,
                "overlap": handler / exchange if exchange > 0 else float("nan"),
                "peak_mem_mb_max": max((d.get("peak_mem_mb") or 0.0 for d in trained), default=0),
            }
        )
    trained_any = any(r["trained"] for r in rounds)
    return {
        "rounds": rounds,
        "gpu_indices": sorted(g for g in gpus if g is not None),
        "misplaced": bad,
        "passed": trained_any and not bad,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--gpus-per-device", type=float, default=0.25)
    parser.add_argument("--cpus-per-device", type=float, default=1.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--overrides", default=DEFAULT_OVERRIDES)
    parser.add_argument("--out", default="ray_gpu", help="result files' name")
    args = parser.parse_args()

    from fedpeat.cli.launch import launch

    overrides = f"{args.overrides} train.device={args.device}".strip()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = launch(
            args.devices,
            overrides,
            output_dir=Path(tmp) / "runs",
            cpus_per_device=args.cpus_per_device,
            gpus_per_device=args.gpus_per_device,
            stream=False,
        )
        if not outcome.ok or outcome.run_dir is None:
            print(f"bench.ray_gpu: the run did not complete ({outcome.status})", file=sys.stderr)
            return 1
        lines = (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    wall = time.perf_counter() - began
    s = summarise(rows, args.device)
    where = machine()
    text = "\n".join(
        [
            "# Devices sharing a GPU under Ray",
            "",
            f"`python -m bench.ray_gpu --devices {args.devices} --gpus-per-device "
            f"{args.gpus_per_device} --device {args.device}` on {where}: {args.devices} "
            f"simulated devices, `{overrides}`, under `flwr run` ({wall:.0f} s in all).",
            "",
            table(
                [
                    "round",
                    "devices trained",
                    "train handlers, summed (s)",
                    "train exchange (s)",
                    "overlap",
                    "largest device peak MB",
                ],
                [
                    [
                        r["round"],
                        r["trained"],
                        f"{r['handler_s_sum']:.1f}",
                        f"{r['train_exchange_s']:.1f}",
                        f"{r['overlap']:.2f}",
                        f"{r['peak_mem_mb_max']:.0f}",
                    ]
                    for r in s["rounds"]
                ],
            ),
            "",
            f"CUDA devices the devices trained on (as each process numbers them; -1: the CPU): "
            f"{s['gpu_indices']}. Trained elsewhere than `{args.device}`: "
            f"{len(s['misplaced'])}. {'pass' if s['passed'] else 'FAIL'}.",
        ]
    )
    write_md(f"{args.out}.md", text)
    write_json(
        f"{args.out}.json",
        {
            "machine": where,
            "devices": args.devices,
            "gpus_per_device": args.gpus_per_device,
            "overrides": overrides,
            "wall_s": wall,
            **s,
        },
    )
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
