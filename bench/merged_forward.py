"""Forward pass of the merged export against the base model and base + unmerged adapter.

Builds the global adapter's shape from the config (planner=fedpipe: the importance-chosen
matrices at the server rank), fills it with small random values, writes `merged/` as a run
does, loads it back with `AutoModelForCausalLM`, and times the same batches through all three,
interleaved (these machines are noisy). Prints ratios to the base model and the largest logit
difference between merged and base + adapter. Writes bench/results/merged_forward.{json,md}.

    python -m bench.merged_forward [--repeats 5] [--overrides "planner=fedpipe"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from bench.common import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overrides", default="planner=fedpipe")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fedpeat.config import compose
    from fedpeat.lora import set_adapter_state
    from fedpeat.model import load_model
    from fedpeat.server_model import ServerModel

    cfg = compose(args.overrides)
    server = ServerModel(cfg)
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in server.initial_state.items()
    }
    set_adapter_state(server.model, state)
    base = load_model(cfg.model)
    ids = torch.randint(
        0, 1000, (8, cfg.data.max_length), generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory() as tmp:
        server.save_merged(state, tmp)
        merged = AutoModelForCausalLM.from_pretrained(tmp).eval()
        models = {"base": base, "merged": merged, "base + adapter (PEFT)": server.model}
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for m in models.values():
                m(input_ids=ids)  # warm-up
            for _ in range(args.repeats):
                for name, m in models.items():
                    start = time.perf_counter()
                    m(input_ids=ids)
                    times[name].append(time.perf_counter() - start)
            diff = float(
                (merged(input_ids=ids).logits - server.model(input_ids=ids).logits).abs().max()
            )
    best = {name: min(t) for name, t in times.items()}
    lines = [
        f"| model | forward s (best of {args.repeats}, 8 x {cfg.data.max_length} tokens) "
        "| vs base |",
        "|---|---|---|",
    ]
    for name, t in best.items():
        lines.append(f"| {name} | {t:.3f} | {t / best['base']:.2f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    table = "\n".join(lines)
    note = f"max |logits merged - logits base+adapter| = {diff:.2e}; {machine}"
    print(table)
    print(note)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merged_forward.json").write_text(
        json.dumps({"machine": machine, "seconds": times, "max_logit_diff": diff}, indent=2) + "\n"
    )
    (RESULTS / "merged_forward.md").write_text(table + f"\n\n{note}\n")


if __name__ == "__main__":
    main()
