"""Peak training memory of one device at one emulator level with its frozen weights at 32, 16,
8 and 4 bits (bitsandbytes), side by side with the cost model's estimate.

Each bit-width runs in a fresh process on the emulator's cached wire form, as a device would:
  runtime   resident memory after imports and data, before the model (Python, torch, tokenizer)
  load      peak while unpacking and quantizing the emulator (fp16 wire -> compute dtype copies)
  train     peak over the training steps, measured after resetting the high-water mark
            (/proc/self/clear_refs) once the model is ready
The estimate covers the training step only, so it is compared with train - runtime.
Writes bench/results/quant_memory.{json,md}.

    python -m bench.quant_memory [--level 0.5] [--steps 4] [--overrides "..."]
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

from bench.emulator_step import RESULTS, peak_rss_mb

BITS = (32, 16, 8, 4)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(bits: int, overrides: str, steps: int, pkg_dir: Path) -> dict[str, float]:
    import torch

    from fedpeat.config import compose
    from fedpeat.data import encode, server_train_data
    from fedpeat.emulator import load_package, unpackage
    from fedpeat.lora import attach_lora
    from fedpeat.model import load_tokenizer
    from fedpeat.quantization import compute_dtype, fast_bf16, quantize_frozen
    from fedpeat.train import local_train

    cfg = compose(overrides)
    device = torch.device("cpu")
    tok = load_tokenizer(cfg.model)
    data = encode(server_train_data(cfg.data), tok, cfg.data.max_length)
    data = [e for e in data if len(e.input_ids) == cfg.data.max_length] or data
    runtime = rss_mb()
    digest = (pkg_dir / "digest").read_text()
    dtype = compute_dtype(bits, getattr(torch, cfg.model.dtype), fast_bf16(device))
    emulator = unpackage(load_package(pkg_dir, digest), dtype=dtype)
    quantize_frozen(emulator.model, bits, device, dtype)
    model = attach_lora(emulator.model, cfg.adapter, layers=emulator.adapter_layers)
    load_peak = peak_rss_mb()
    pad = int(tok.pad_token_id)
    local_train(model, data, replace(cfg.train, local_steps=1), 0, pad, device)  # warm-up
    reset_peak()
    start = time.perf_counter()
    result = local_train(model, data, replace(cfg.train, local_steps=steps), 1, pad, device)
    seconds = time.perf_counter() - start
    return {
        "runtime_mb": runtime,
        "load_peak_mb": load_peak,
        "train_peak_mb": peak_rss_mb(),
        "tokens_per_s": result.tokens / seconds,
        "train_loss": result.train_loss,
    }


def prepare(overrides: str, level: float, pkg_dir: Path) -> tuple[dict[int, float], bool]:
    """Cut and cache the emulator; the cost model's estimate for each bit-width, computing in
    bf16 where this machine has it natively (as the planner assumes for a device)."""
    import torch

    from fedpeat.config import DeviceProfile, compose
    from fedpeat.emulator import save_package
    from fedpeat.quantization import fast_bf16
    from fedpeat.task import ServerModel
    from strategies.planning import compute_bits

    server = ServerModel(compose(overrides))
    pkg = server.package(level)
    save_package(pkg, pkg_dir)
    (pkg_dir / "digest").write_text(pkg.digest)
    bf16 = fast_bf16(torch.device("cpu"))
    here = DeviceProfile(bf16=bf16)
    est = {
        b: server.memory_need_mb(level, b, compute_bits=compute_bits(b, here, server.model_bits))
        for b in BITS
    }
    return est, bf16


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--overrides", default="")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pkg-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.overrides, args.steps, args.pkg_dir)))
        return

    rows: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        est, bf16 = prepare(args.overrides, args.level, Path(tmp))
        for bits in BITS:
            cmd = [sys.executable, "-m", "bench.quant_memory", "--child", str(bits)]
            cmd += ["--steps", str(args.steps), "--overrides", args.overrides, "--pkg-dir", tmp]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            rows[bits] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"measured {bits}-bit: {rows[bits]}", file=sys.stderr)
    full = rows[32]
    lines = [
        f"| frozen weights (keep {args.level}) | train peak MB | vs 32-bit | runtime MB "
        "| train - runtime MB | estimate MB | measured / estimate | load peak MB | tokens/s "
        "| vs 32-bit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    quant = "bf16" if bf16 else "fp32"
    names = {
        32: "32-bit fp32",
        16: "16-bit bf16" + ("" if bf16 else " (emulated here)"),
        8: f"8-bit int8, {quant} compute",
        4: f"4-bit NF4, {quant} compute",
    }
    for bits, r in rows.items():
        net = r["train_peak_mb"] - r["runtime_mb"]
        lines.append(
            f"| {names[bits]} | {r['train_peak_mb']:.0f} "
            f"| {r['train_peak_mb'] / full['train_peak_mb']:.2f} "
            f"| {r['runtime_mb']:.0f} | {net:.0f} | {est[bits]:.0f} | {net / est[bits]:.2f} "
            f"| {r['load_peak_mb']:.0f} | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / full['tokens_per_s']:.2f} |"
        )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, bitsandbytes on CPU, "
        f"native bf16: {'yes' if bf16 else 'no'}"
    )
    table = "\n".join(lines)
    print(table)
    print(f"\n{machine}; one process per row")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_memory.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "level": args.level,
                "bf16": bf16,
                "rows": rows,
                "estimate_mb": est,
            },
            indent=2,
        )
        + "\n"
    )
    (RESULTS / "quant_memory.md").write_text(table + f"\n\n{machine}\n")


if __name__ == "__main__":
    main()
