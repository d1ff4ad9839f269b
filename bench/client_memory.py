"""One device's peak training memory and throughput: Fed-FT, FlowerTune-style, FedPEAT emulators.

Each configuration runs in a fresh process on the same batches (default batch and length), as a
device would hold it:

  fed_ft       the full model, every weight trained with AdamW (fp32)
  flowertune   the full model, frozen weights in 4-bit NF4, LoRA on every layer (FlowerTune's
               LLM recipe)
  full_lora    the full model in fp32 with FedPEAT's adapter (the adapter region's layers): the
               reference for throughput
  keep K, B    FedPEAT's emulator at keep ratio K (from its cached wire form), frozen weights at
               B = 16 (bf16) or 4 (NF4) bits, the same adapter

Memory: `runtime` is the resident size after imports and data, before the model; the training
peak is VmHWM over the timed steps after the high-water mark is reset once the model is ready
and has taken one step (so optimizer states exist); `train - runtime` is what training needs
beyond the interpreter and libraries, the figure the targets and the cost model speak of. The
load's own peak (package read, model filled, weights quantized) is VmHWM over the load; the
process peak is the higher of the two, load included. Where
the CPU lacks native bf16, 16-bit steps are emulated and very slow: there the one warm-up step
is the measured one. Throughput: trained tokens per second over the timed steps; the full model
and keep 0.5 / 4-bit are profiled for one more step (torch.profiler, self CPU time by operator
and input shapes) to name what bounds a step.
Writes bench/results/client_memory.{json,md}.

    python -m bench.client_memory [--steps 2] [--overrides "..."] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    machine,
    memory_meters,
    peak_rss_mb,
    table,
    write_json,
    write_md,
)

LEVELS = (0.5, 0.4, 0.3, 0.2)  # the default emulator levels (conf/emulator), and 0.5
BITS = (32, 8, 4)  # frozen-weight widths the planner offers on a CPU without native bf16
FULL_FT_LR = 5.0e-5  # experiment=fed_ft's rate; memory does not depend on it
PROFILED = ("full_lora", "keep0.5-4")
REQUIRED = {"fed_ft", *PROFILED}  # what the targets are read from; `--only` with `--out` reports


def bits(device: str) -> tuple[int, ...]:
    """The widths measured: a GPU (native bf16) is offered 16-bit plans too."""
    return (32, 16, 8, 4) if device == "cuda" else BITS


def configs(device: str = "cpu") -> list[str]:
    widths = bits(device)
    return ["fed_ft", "flowertune", "full_lora"] + [f"keep{k}-{b}" for b in widths for k in LEVELS]


def _model(name: str, cfg: Any, pkg_dir: Path, device: Any) -> Any:
    """What the device holds for configuration `name`, ready to train on `device`."""
    import torch

    from fedpeat.emulator import adapter_region, unpackage
    from fedpeat.emulator_cache import load_package
    from fedpeat.lora import attach_lora
    from fedpeat.model import load_model
    from fedpeat.quantization import compute_dtype, fast_bf16, quantize_frozen

    cpu = torch.device("cpu")
    model_dtype = getattr(torch, cfg.model.dtype)
    bf16 = fast_bf16(device)
    if name == "fed_ft":
        model = load_model(cfg.model, device, cached=False)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if name == "flowertune":
        base = load_model(cfg.model, cpu, cached=False)
        quantize_frozen(base, 4, device, compute_dtype(4, model_dtype, bf16))
        return attach_lora(base, cfg.adapter)  # every layer
    if name == "full_lora":
        base = load_model(cfg.model, device, cached=False)
        n = int(base.config.num_hidden_layers)
        e = cfg.emulator
        return attach_lora(base, cfg.adapter, layers=adapter_region(n, e.bottom, e.top))
    keep, width = name.removeprefix("keep").split("-")
    digest = (pkg_dir / f"{keep}.digest").read_text()
    dtype = compute_dtype(int(width), model_dtype, bf16)
    emulator = unpackage(load_package(pkg_dir / keep, digest), dtype=dtype, consume=True)
    quantize_frozen(emulator.model, int(width), device, dtype)
    return attach_lora(emulator.model, cfg.adapter, layers=emulator.adapter_layers)


def _profile(
    model: Any, data: Any, train: Any, pad: int, vocab: int, device: Any
) -> list[dict[str, Any]]:
    """Self time of one training step by operator and input shapes, largest first (CPU time on
    a CPU, kernel time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    from fedpeat.train import local_train

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        local_train(model, data, replace(train, local_steps=1), 7, pad, device)
    events = prof.key_averages(group_by_input_shape=True)

    def own(e: Any) -> float:
        return float(e.self_device_time_total if gpu else e.self_cpu_time_total)

    total = sum(own(e) for e in events) or 1.0
    top = sorted(events, key=lambda e: -own(e))[:6]
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes),
            "share": own(e) / total,
            "lm_head": any(vocab in s for s in e.input_shapes if isinstance(s, list)),
        }
        for e in top
    ]


def measure(name: str, overrides: str, steps: int, pkg_dir: Path, where: str) -> dict[str, Any]:
    """Runs in the child process."""
    import torch

    from fedpeat.config import compose
    from fedpeat.data import encode, server_train_data
    from fedpeat.model import load_tokenizer
    from fedpeat.quantization import fast_bf16
    from fedpeat.train import local_train

    cfg = compose(overrides)
    device = torch.device(where)
    now_mb, peak_mb, reset = memory_meters(device)
    tok = load_tokenizer(cfg.model)
    data = encode(server_train_data(cfg.data), tok, cfg.data.max_length)
    data = [e for e in data if len(e.input_ids) == cfg.data.max_length] or data
    train = replace(cfg.train, lr=FULL_FT_LR) if name == "fed_ft" else cfg.train
    pad = int(tok.pad_token_id)
    runtime = now_mb()
    reset()  # the load's own peak: the package, the model being filled, quantization
    model = _model(name, cfg, pkg_dir, device)
    load_peak = peak_mb()
    model_mb = now_mb() - runtime
    slow = name.endswith("-16") and not fast_bf16(device)
    if not slow:  # optimizer states exist from the first step on
        local_train(model, data, replace(train, local_steps=1), 0, pad, device)
    reset()
    start = time.perf_counter()
    timed = replace(train, local_steps=1 if slow else steps)
    result = local_train(model, data, timed, 1, pad, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "device": where,
        "runtime_mb": runtime,
        "model_mb": model_mb,
        "load_peak_mb": load_peak,
        "train_peak_mb": peak_mb(),
        "host_peak_mb": peak_rss_mb(),
        "tokens_per_s": result.tokens / seconds,
        "step_s": seconds / result.steps,
        "timed_steps": result.steps,
        "first_step_timed": slow,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if name in PROFILED:
        out["profile"] = _profile(model, data, train, pad, len(tok), device)
    return out


def prepare(overrides: str, pkg_dir: Path, where: str = "cpu") -> dict[str, Any]:
    """Cut every emulator once (as the server does) into its wire form; the cost model's
    estimates and the bytes each configuration exchanges."""
    import torch

    from fedpeat.config import DeviceProfile, compose
    from fedpeat.cost import activation_bytes, load_memory_bytes, logits_bytes
    from fedpeat.emulator_cache import save_package
    from fedpeat.quantization import fast_bf16
    from fedpeat.server_model import ServerModel
    from strategies.planning import compute_bits

    cfg = compose(overrides)
    server = ServerModel(cfg)
    here = DeviceProfile(bf16=fast_bf16(torch.device(where)))
    runtime = cfg.planner.runtime_mb
    est: dict[str, float] = {}
    load: dict[str, float] = {}
    for keep in LEVELS:
        pkg = server.package(keep)
        save_package(pkg, pkg_dir / str(keep))
        (pkg_dir / f"{keep}.digest").write_text(pkg.digest)
        for width in bits(where):
            cb = compute_bits(width, here, server.model_bits)
            name = f"keep{keep}-{width}"
            est[name] = server.memory_need_mb(keep, width, compute_bits=cb) - runtime
            load[name] = load_memory_bytes(server.emulator_shape(keep), cb) / 2**20
    est["full_lora"] = server.memory_need_mb(None) - runtime
    # Full fine-tuning: weights, gradients and AdamW's two moments (16 B per fp32 parameter)
    # plus the same activations and logits as a LoRA step.
    shape, b, s = server.full_shape, cfg.train.batch_size, cfg.data.max_length
    est["fed_ft"] = (
        16 * shape.params
        + activation_bytes(shape, b, s)
        + logits_bytes(shape, b, s, cfg.train.loss_chunk)
    ) / 2**20
    layers = {k: len(server.emulator(k).layers) for k in LEVELS}
    # A step's matrix products per token scale with the decoder's linear weights plus the LM
    # head (the embedding lookup is free, attention at these lengths small): the FLOP ratio.
    full = server.full_shape.linear_params + shape.vocab * shape.hidden
    flop_ratio = {
        k: full / (server.emulator_shape(k).linear_params + shape.vocab * shape.hidden)
        for k in LEVELS
    }
    return {
        "estimate_mb": est,
        "load_estimate_mb": load,
        "layers": layers,
        "flop_ratio": flop_ratio,
    }


def _label(name: str, layers: dict[str, int]) -> str:
    if name == "fed_ft":
        return "Fed-FT: full model, full fine-tuning (fp32, AdamW)"
    if name == "flowertune":
        return "FlowerTune-style: full model 4-bit NF4 + LoRA (all layers)"
    if name == "full_lora":
        return "full model fp32 + FedPEAT's LoRA"
    keep, width = name.removeprefix("keep").split("-")
    kind = {"32": "fp32", "16": "bf16", "8": "int8", "4": "NF4"}[width]
    return f"FedPEAT emulator keep {keep} ({layers[keep]} layers), {width}-bit {kind}"


def process_peak_mb(row: dict[str, Any]) -> float:
    """The process's whole peak: the load's or the training's, whichever is higher."""
    return float(max(row["train_peak_mb"], row.get("load_peak_mb", 0.0)))


def report(rows: dict[str, dict[str, Any]], prep: dict[str, Any]) -> dict[str, Any]:
    fed = rows["fed_ft"]
    fed_proc = process_peak_mb(fed)
    fed_net = fed["train_peak_mb"] - fed["runtime_mb"]
    ref = rows["full_lora"]["tokens_per_s"]
    layers = {str(k): v for k, v in prep["layers"].items()}
    lines, speed = [], {}
    for name, r in rows.items():
        net = r["train_peak_mb"] - r["runtime_mb"]
        est = prep["estimate_mb"].get(name)
        flops = {str(k): v for k, v in prep["flop_ratio"].items()}.get(
            name.removeprefix("keep").split("-")[0]
        )
        if flops and name.startswith("keep"):
            speed[name] = r["tokens_per_s"] / ref / flops
        lines.append(
            [
                _label(name, layers),
                f"{net:.0f}",
                f"{net / fed_net:.3f}",
                f"1/{fed_net / net:.1f}",
                f"{process_peak_mb(r):.0f}",
                f"{process_peak_mb(r) / fed_proc:.2f}",
                f"{est:.0f}" if est else "-",
                f"{net / est:.2f}" if est else "-",
                f"{r['tokens_per_s']:.0f}" + (" (1st step)" if r["first_step_timed"] else ""),
                f"{r['tokens_per_s'] / ref:.2f}",
                f"{flops:.2f}" if name in speed else "-",
                f"{speed[name]:.2f}" if name in speed else "-",
            ]
        )
    header = [
        "configuration",
        "train - runtime MB",
        "vs Fed-FT",
        "fraction",
        "process peak MB (load or train)",
        "vs Fed-FT",
        "estimate MB",
        "measured / estimate",
        "tokens/s",
        "vs full model",
        "FLOP ratio",
        "speed-up / FLOP ratio",
    ]
    calibration = []
    for name, r in rows.items():
        net = r["train_peak_mb"] - r["runtime_mb"]
        est = prep["estimate_mb"].get(name)
        load_est = prep.get("load_estimate_mb", {}).get(name)
        load = r.get("load_peak_mb", 0.0) - r["runtime_mb"]
        if est:
            calibration.append(
                {
                    "config": name,
                    "train_mb": net,
                    "estimate_mb": est,
                    "train_ratio": net / est,
                    "load_mb": load if load_est else None,
                    "load_estimate_mb": load_est,
                    "load_ratio": load / load_est if load_est else None,
                }
            )
    target = rows["keep0.5-4"]
    t_net = target["train_peak_mb"] - target["runtime_mb"]
    ratio = t_net / fed_net
    hot = {n: rows[n]["profile"] for n in PROFILED}
    return {
        "header": header,
        "lines": lines,
        "target": {
            "config": "keep0.5-4",
            "ratio": ratio,
            "limit": 1 / 8,
            "met": ratio <= 1 / 8,
            "process_ratio": process_peak_mb(target) / fed_proc,
        },
        "hot_spots": hot,
        "calibration": calibration,
        "speed": {
            "per_config": speed,
            "worst": min(speed, key=speed.__getitem__) if speed else None,
            "limit": 0.8,
            "met": bool(speed) and min(speed.values()) >= 0.8,
        },
    }


def _hot_lines(hot: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = []
    for name, ops in hot.items():
        parts = [
            f"{o['op']} {o['shapes']}{' (LM head)' if o['lm_head'] else ''} {100 * o['share']:.0f}%"
            for o in ops[:4]
        ]
        head = sum(o["share"] for o in ops if o["lm_head"])
        out.append(
            f"- {name}: " + "; ".join(parts) + f". LM-head operators among the top: "
            f"{100 * head:.0f}% of the step."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--overrides", default="")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated configurations (reported only with --out, and with "
        + ",".join(sorted(REQUIRED))
        + ")",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="report the measured rows of bench/results/client_memory.json against the current "
        "estimates (no new measurement)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where each device trains (cuda: the allocator's peaks, bf16 rows added)",
    )
    parser.add_argument(
        "--out", default="", help="result files' name (default client_memory, client_memory_cuda)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pkg-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        row = measure(args.child, args.overrides, args.steps, args.pkg_dir, args.device)
        print(json.dumps(row))
        return
    out_name = args.out or ("client_memory" if args.device == "cpu" else "client_memory_cuda")
    every = configs(args.device)
    names = args.only.split(",") if args.only else every
    rows: dict[str, dict[str, Any]] = {}
    if args.reuse:
        rows = json.loads((RESULTS / f"{out_name}.json").read_text())["rows"]
        names = []
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(args.overrides, Path(tmp), args.device)
        for i, name in enumerate(names, 1):
            cmd = [sys.executable, "-m", "bench.client_memory", "--child", name]
            cmd += ["--steps", str(args.steps), "--overrides", args.overrides, "--pkg-dir", tmp]
            cmd += ["--device", args.device]
            began = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                raise RuntimeError(f"bench.client_memory {name} failed:\n{out.stderr[-3000:]}")
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"[memory {i}/{len(names)}] {name}: train peak {rows[name]['train_peak_mb']:.0f}"
                f" MB, {rows[name]['tokens_per_s']:.0f} tokens/s "
                f"({time.perf_counter() - began:.0f}s)",
                file=sys.stderr,
            )
    if set(every) - set(rows) and not (args.out and set(rows) >= REQUIRED):
        print(
            "partial run (--only, without --out and the rows the targets need): no report",
            file=sys.stderr,
        )
        return
    rep = report(rows, prep)
    where = machine()
    t, sp = rep["target"], rep["speed"]
    text = "\n".join(
        [
            table(rep["header"], rep["lines"]),
            "",
            f"Target: keep 0.5 with 4-bit weights needs {t['ratio']:.3f} of Fed-FT's training "
            f"memory (limit 1/8 = 0.125): {'met' if t['met'] else 'missed'}; counting the "
            f"whole process (interpreter and libraries too) {t['process_ratio']:.2f} "
            f"(limit 1/6 = 0.167: {'met' if t['process_ratio'] <= 1 / 6 else 'missed'}).",
            "",
            f"Throughput: every emulator row's speed-up over the full model at least 0.8 of its "
            f"FLOP ratio: {'met' if sp['met'] else 'missed'} (lowest: {sp['worst']}, "
            f"{sp['per_config'].get(sp['worst'], float('nan')):.2f}).",
            "",
            "The device's memory check against measured peaks (`train - runtime` and the "
            "load's peak over the runtime; the estimate is `fedpeat.cost`'s, the load estimate "
            "`load_memory_bytes`; target 0.9-1.1):",
            "",
            table(
                [
                    "configuration",
                    "train MB",
                    "estimate MB",
                    "ratio",
                    "load MB",
                    "load est. MB",
                    "load ratio",
                ],
                [
                    [
                        c["config"],
                        f"{c['train_mb']:.0f}",
                        f"{c['estimate_mb']:.0f}",
                        f"{c['train_ratio']:.2f}",
                        "-" if c["load_mb"] is None else f"{c['load_mb']:.0f}",
                        "-" if c["load_estimate_mb"] is None else f"{c['load_estimate_mb']:.0f}",
                        "-" if c["load_ratio"] is None else f"{c['load_ratio']:.2f}",
                    ]
                    for c in rep["calibration"]
                ],
            ),
            "",
            "Hot spots (self CPU time of one training step, top operators):",
            *_hot_lines(rep["hot_spots"]),
            "",
            f"{where}; batch and length from the config; one process per row"
            + (
                "; on the GPU, memory is the CUDA allocator's peak (tensors; the CUDA context "
                "and cached blocks not counted), `runtime` what was allocated before the model."
                if args.device == "cuda"
                else "."
            ),
        ]
    )
    write_md(f"{out_name}.md", text)
    write_json(
        f"{out_name}.json",
        {
            "machine": where,
            "rows": rows,
            **prep,
            "target": t,
            "hot_spots": rep["hot_spots"],
            "calibration": rep["calibration"],
        },
    )


if __name__ == "__main__":
    main()
