"""One local LoRA training step on each emulator level against the full model, side by side.

Each configuration runs in a fresh process (peak resident memory only grows within a process),
with the same batch: it loads the model, cuts the emulator, attaches the adapter, takes one
warm-up step and then `--steps` timed steps. Printed as ratios to the full model, with the cost
model's estimate next to the measured peak. Writes bench/results/emulator_step.{json,md}.

    python -m bench.emulator_step [--steps 8] [--overrides "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """VmHWM: this address space's peak resident memory. (ru_maxrss would also count the
    parent's, since Linux carries it across fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(level: float | None, overrides: str, steps: int, pkg_dir: Path) -> dict[str, float]:
    """Runs inside the child process: it loads what a device would (the full model, or the
    emulator's cached wire form) and trains."""
    import torch

    from fedpeat.config import compose
    from fedpeat.data import encode, server_train_data
    from fedpeat.emulator import load_package, unpackage
    from fedpeat.lora import attach_lora
    from fedpeat.model import load_model, load_tokenizer, resolve_device
    from fedpeat.train import local_train

    cfg = compose(overrides)
    device = resolve_device(cfg.train.device)
    tok = load_tokenizer(cfg.model)
    data = encode(server_train_data(cfg.data), tok, cfg.data.max_length)
    # Full batches only, so every configuration sees the same tokens.
    data = [e for e in data if len(e.input_ids) == cfg.data.max_length] or data
    e = cfg.emulator
    if level is None:
        model = load_model(cfg.model, device, cached=False)
        n = model.config.num_hidden_layers
        layers = list(range(e.bottom)) + list(range(n - e.top, n))
    else:
        digest = (pkg_dir / f"{level}.digest").read_text()
        emulator = unpackage(load_package(pkg_dir, digest), dtype=getattr(torch, cfg.model.dtype))
        model, layers = emulator.model.to(device), emulator.adapter_layers
        n = len(emulator.layers)
    lora = attach_lora(model, cfg.adapter, layers=layers)
    one = replace(cfg.train, local_steps=1)
    local_train(lora, data, one, 0, int(tok.pad_token_id), device)  # warm-up
    timed = replace(cfg.train, local_steps=steps)
    start = time.perf_counter()
    result = local_train(lora, data, timed, 1, int(tok.pad_token_id), device)
    seconds = time.perf_counter() - start
    return {
        "peak_rss_mb": peak_rss_mb(),
        "tokens_per_s": result.tokens / seconds,
        "step_s": seconds / steps,
        "layers": n,
    }


def prepare(overrides: str, pkg_dir: Path) -> dict[str, float]:
    """Build every emulator once (as the server does), store its wire form as a device would
    cache it, and return the cost model's memory estimates."""
    from fedpeat.config import compose
    from fedpeat.emulator import save_package
    from fedpeat.task import ServerModel

    cfg = compose(overrides)
    server = ServerModel(cfg)
    out = {"full": server.memory_need_mb(None)}
    for lv in cfg.emulator.levels:
        out[str(lv)] = server.memory_need_mb(lv)
        if lv < 1.0:
            pkg = server.package(lv)
            save_package(pkg, pkg_dir)
            (pkg_dir / f"{lv}.digest").write_text(pkg.digest)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--overrides", default="")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pkg-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        level = None if args.child == "full" else float(args.child)
        print(json.dumps(measure(level, args.overrides, args.steps, args.pkg_dir)))
        return

    from fedpeat.config import compose

    levels = ["full", *(str(lv) for lv in compose(args.overrides).emulator.levels if lv < 1.0)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        est = prepare(args.overrides, Path(tmp))
        for name in levels:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.emulator_step",
                    "--child",
                    name,
                    "--steps",
                    str(args.steps),
                    "--overrides",
                    args.overrides,
                    "--pkg-dir",
                    tmp,
                ],
                capture_output=True,
                text=True,
                check=True,
                env=os.environ,
            )
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"measured {name}: {rows[name]}", file=sys.stderr)
    full = rows["full"]
    lines = [
        "| model | layers | peak RSS MB | vs full | cost-model estimate MB | tokens/s | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = "full model" if name == "full" else f"emulator keep {name}"
        estimate = est[name if name == "full" else str(float(name))]
        lines.append(
            f"| {label} | {r['layers']} | {r['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {estimate:.0f} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / full['tokens_per_s']:.2f} |"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    table = "\n".join(lines)
    print(table)
    print(f"\n{machine}; one process per row; peak RSS includes Python, torch and the data")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "emulator_step.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "estimate_mb": est}, indent=2) + "\n"
    )
    (RESULTS / "emulator_step.md").write_text(table + f"\n\n{machine}\n")


if __name__ == "__main__":
    main()
