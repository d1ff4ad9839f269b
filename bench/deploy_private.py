"""Partners with private data, deployed: a loopback SuperLink and three SuperNodes with TLS and
SuperNode authentication, each training on its own data file, on the default model.

Each partner's file holds plays no other partner holds (the devices' share of the embedded
Shakespeare, partitioned by play as in simulation, written as JSONL `text` rows in a directory
of its own); nodes read only their own file (node
config `data-path`), the server keeps its corpus for its own training and evaluation. Every
node takes part every round (`controller=none`, so the table shows each partner's training);
the rest is the default experiment (FedPipe planner, 4/8-bit emulators). Per round: validation
plug-in perplexity, which partners trained and on how many examples, bytes, wall seconds.
Writes bench/results/deploy_private.{md,json}.

    python -m bench.deploy_private [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json, write_md

OVERRIDES = "controller=none"
PARTNERS = 3


def private_files(where: Path, partners: int) -> list[Path]:
    """One JSONL file per partner: the default partition i of the devices' share of the corpus
    (whole plays, none in two files, none of the server's held-out or training samples)."""
    from fedpeat.config import compose
    from fedpeat.data import device_data

    cfg = compose("")
    paths = []
    for i in range(partners):
        split = device_data(cfg.data, cfg.partition, i, partners)
        path = where / f"partner-{i}" / "own.jsonl"
        path.parent.mkdir(parents=True)
        rows = [json.dumps({"text": s["response"]}) for s in [*split.train, *split.test]]
        path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths


def summarise(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Per round: validation perplexity, each trained partner's examples and status, bytes."""
    out = []
    for r in rows:
        out.append(
            {
                "round": r["round"],
                "plugin_ppl": r["plugin_ppl"],
                "devices": [
                    {k: d.get(k) for k in ("node", "status", "examples", "level", "bits", "rank")}
                    for d in r.get("devices") or []
                ],
                "mb": (r.get("bytes_down", 0) + r.get("bytes_up", 0)) / 2**20,
            }
        )
    profiles = {n: p for r in rows for n, p in (r.get("profiles") or {}).items()}
    return {
        "rounds": out,
        "data_sizes": sorted(int(p["data-size"]) for p in profiles.values()),
        "private": all(p.get("private-data") for p in profiles.values()),
        "wall_s": wall_s,
    }


def markdown(result: dict[str, Any]) -> str:
    body = [
        [
            r["round"],
            f"{r['plugin_ppl']:.2f}",
            "; ".join(
                f"{d['status']} ({d['examples']} examples, keep {d['level']}, {d['bits']}-bit)"
                for d in r["devices"]
            )
            or "-",
            f"{r['mb']:.1f}",
        ]
        for r in result["rounds"]
    ]
    return "\n".join(
        [
            "# Partners with private data, deployed",
            "",
            f"`python -m bench.deploy_private --rounds {result['rounds_run']}` on "
            f"{result['machine']}: a loopback SuperLink and {PARTNERS} SuperNodes with TLS and "
            "SuperNode authentication, each reading only its own JSONL file (plays no other "
            f"partner holds), the default model and experiment with `{OVERRIDES}`. Training "
            f"examples each node reported: {result['data_sizes']} (all private: "
            f"{result['private']}). Status: {result['status']}; {result['wall_s']:.0f} s in all.",
            "",
            table(["round", "validation ppl", "partners (status, examples, plan)", "MB"], body),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from fedpeat.cli.deploy import deploy

    with tempfile.TemporaryDirectory(prefix="fedpeat-partners-") as tmp:
        where = Path(tmp)
        files = private_files(where, PARTNERS)
        began = time.perf_counter()
        outcome = deploy(
            PARTNERS,
            f"{OVERRIDES} rounds={args.rounds}",
            [f"data-path='{p}'" for p in files],
            secure=True,
            output_dir=where / "runs",
            flwr_home=where / "flwr",
            stream=False,
            device_cache_dir=where / "devices",
        )
        wall = time.perf_counter() - began
        if outcome.run_dir is None or not (outcome.run_dir / "metrics.jsonl").is_file():
            raise SystemExit(f"the deployment wrote no metrics: {outcome.status}")
        rows = [json.loads(x) for x in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {
        "machine": machine(),
        "rounds_run": args.rounds,
        "status": outcome.status,
        **summarise(rows, wall),
    }
    write_json("deploy_private.json", result)
    write_md("deploy_private.md", markdown(result))
    if not outcome.ok:
        raise SystemExit(f"the deployment did not complete: {outcome.status}")


if __name__ == "__main__":
    main()
