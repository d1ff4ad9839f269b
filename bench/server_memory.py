"""The server's peak memory over a run's work: the default model and a ~10x larger one.

Each model runs in a fresh process through what a run's server does, phase by phase:

  load       ServerModel: the base model, the plug-in model over its tensors, the data and (with
             the planner) the importance calibration
  packages   every device level's emulator and its wire package, built as round 1 sends them
             (each put into the record a message carries, then dropped, as a sent message is)
  round      one validation evaluation of the plug-in, one round of the server's own training,
             the emulator-vs-plug-in gap's evaluation
  export     the PEFT adapter and the merged model written to disk

Memory is the process's resident peak (VmHWM) after each phase, less the runtime (interpreter,
libraries and data, measured before the model loads): the figure to set against the base model's
weights plus one emulator package, the target being at most 1.3x that. `llama_1b3` is a random
Llama of ~1.3B parameters built from its config (conf/model/llama_1b3.yaml: no download), run
with a lighter recipe so it takes minutes on a CPU (2 distillation steps, 8 evaluation samples,
one local step); the recipe changes the time, not what is resident.
Writes bench/results/server_memory.{json,md}.

    python -m bench.server_memory [--only default,llama_1b3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    cuda_mb,
    cuda_peak_mb,
    cuda_reset_peak,
    machine,
    peak_rss_mb,
    reset_peak,
    rss_mb,
    table,
    write_json,
    write_md,
)

TARGET = 1.3
ROWS = {
    "default": "",
    "llama_1b3": (
        "model=llama_1b3 emulator.distill.steps=2 emulator.distill.samples=8 "
        "data.server_eval_samples=8 eval.test_samples=8 train.local_steps=1 "
        "planner.calibration_batches=1"
    ),
}


def _weights_mb(model: Any) -> float:
    """Bytes of a model's distinct tensors (a tied head counted once), in MiB."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


class _Meter:
    """Each phase's peak over the runtime: the resident set, and on a GPU also the CUDA
    allocator's tensors (the server's weights live there; packages are built on the host)."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu
        self.runtime = rss_mb()
        self.gpu_runtime = cuda_mb() if gpu else 0.0
        self.host: dict[str, float] = {}
        self.device: dict[str, float] = {}

    def reset(self) -> None:
        reset_peak()
        if self.gpu:
            cuda_reset_peak()

    def take(self, phase: str) -> None:
        self.host[phase] = peak_rss_mb() - self.runtime
        if self.gpu:
            self.device[phase] = cuda_peak_mb() - self.gpu_runtime


def measure(overrides: str, where: str = "cpu") -> dict[str, Any]:
    """Runs in the child process: each phase's peak over the runtime, in MiB."""
    import torch

    from fedpeat.config import compose
    from fedpeat.model import cache_dir
    from fedpeat.server_model import ServerModel
    from strategies.round_stats import to_record

    torch.manual_seed(0)
    cfg = compose(f"{overrides} train.device={where}".strip())
    meter = _Meter(where == "cuda")
    meter.reset()
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    server = ServerModel(cfg)
    meter.take("load")
    seconds["load"] = time.perf_counter() - began

    began, levels = time.perf_counter(), server.device_levels()
    cached = cache_dir() / "emulators"
    before = {p.name: p.stat().st_mtime for p in cached.glob("*.safetensors")}
    meter.reset()
    for level in levels:  # a machine's first run distils them (then they come from its cache)
        server.emulator(level)
    after = {p.name: p.stat().st_mtime for p in cached.glob("*.safetensors")}
    meter.take("emulators")
    seconds["emulators"] = time.perf_counter() - began

    began, package_mb = time.perf_counter(), 0.0
    meter.reset()
    for level in levels:
        record = to_record(server.package(level).state, consume=True)  # as the strategy does
        package_mb = max(package_mb, record.count_bytes() / 2**20)
        del record
    meter.take("packages")
    seconds["packages"] = time.perf_counter() - began

    began = time.perf_counter()
    meter.reset()
    state = server.initial_state
    plugin = server.evaluate(state).ppl
    state, _, _ = server.train(state, 1)
    gap = server.emulator_ppl(min(levels), state).ppl if levels else None
    meter.take("round")
    seconds["round"] = time.perf_counter() - began

    began = time.perf_counter()
    meter.reset()
    with tempfile.TemporaryDirectory() as tmp:
        server.save_adapter(state, str(Path(tmp) / "adapter"), "base")
        server.save_merged(state, str(Path(tmp) / "merged"))
    meter.take("export")
    seconds["export"] = time.perf_counter() - began
    return {
        "overrides": overrides,
        "device": where,
        "params": int(
            sum(p.numel() for p in {p.data_ptr(): p for p in server.base.parameters()}.values())
        ),
        "layers": int(server.base.config.num_hidden_layers),
        "levels": levels,
        "runtime_mb": meter.runtime,
        "base_mb": _weights_mb(server.base),
        "package_mb": package_mb,
        # On a GPU the phase peaks are the allocator's (where the weights are), the host's
        # resident peaks beside them; on a CPU the resident peaks.
        "phase_peak_mb": meter.device if meter.gpu else meter.host,
        "host_phase_peak_mb": meter.host,
        # Distilled here (a cache miss: this machine's first run) or loaded from the cache.
        "distilled_here": after != before,
        "phase_s": seconds,
        "plugin_ppl": plugin,
        "emulator_ppl": gap,
    }


def report(rows: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    header = [
        "model",
        "parameters",
        "base weights MB",
        "one package MB",
        "peak - runtime MB (every run)",
        "ratio to base + package",
        "first run: distillation peak MB (ratio)",
        "phase peaks: load / emulators / packages / round / export MB",
    ]
    lines, summary = [], {}
    for name, r in rows.items():
        p = r["phase_peak_mb"]
        peak = max(v for k, v in p.items() if k != "emulators" or not r["distilled_here"])
        bound = r["base_mb"] + r["package_mb"]
        ratio, first = peak / bound, max(p.values()) / bound
        summary[name] = {
            "peak_mb": peak,
            "ratio": ratio,
            "met": ratio <= TARGET,
            "first_run_peak_mb": max(p.values()),
            "first_run_ratio": first,
        }
        lines.append(
            [
                name,
                f"{r['params'] / 1e9:.2f} B",
                f"{r['base_mb']:.0f}",
                f"{r['package_mb']:.0f}",
                f"{peak:.0f}",
                f"{ratio:.2f} (<= {TARGET}: {'met' if ratio <= TARGET else 'missed'})",
                f"{p['emulators']:.0f} ({first:.2f})" if r["distilled_here"] else "cached",
                " / ".join(
                    f"{p[k]:.0f}" for k in ("load", "emulators", "packages", "round", "export")
                ),
            ]
        )
    return table(header, lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated rows: " + ",".join(ROWS))
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the server's model lives (cuda: the allocator's peaks, host peaks beside)",
    )
    parser.add_argument("--overrides", default="", help="added to every row's overrides")
    parser.add_argument(
        "--out", default="", help="result files' name (default server_memory, server_memory_cuda)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(f"{ROWS[args.child]} {args.overrides}".strip(), args.device)))
        return
    out_name = args.out or ("server_memory" if args.device == "cpu" else "server_memory_cuda")
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {sorted(ROWS)}")
    rows: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names, 1):
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as cache:
            if name != "default":  # a random model's distilled emulators are scratch
                env["FEDPEAT_CACHE_DIR"] = cache
            began = time.perf_counter()
            cmd = [sys.executable, "-m", "bench.server_memory", "--child", name]
            cmd += ["--device", args.device, "--overrides", args.overrides]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"bench.server_memory {name} failed:\n{out.stderr[-3000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        peak = max(rows[name]["phase_peak_mb"].values())
        print(
            f"[server memory {i}/{len(names)}] {name}: peak {peak:.0f} MB over the runtime "
            f"({time.perf_counter() - began:.0f}s)",
            file=sys.stderr,
        )
    text, summary = report(rows)
    where = machine()
    md = "\n".join(
        [
            "# Server memory",
            "",
            f"`python -m bench.server_memory{'' if args.device == 'cpu' else ' --device cuda'}`"
            f" on {where}. Peak "
            + (
                "resident memory of a fresh process"
                if args.device == "cpu"
                else "CUDA allocator memory (the server's weights live on the GPU; the host's "
                "resident peaks are in the JSON beside) of a fresh process"
            )
            + " through a run's server work (load, every level's package, one round, "
            "export), less its runtime (interpreter, libraries, data), against the base model's "
            "weights plus the largest emulator package.",
            "",
            text,
            "",
        ]
    )
    if set(ROWS) - set(rows) and not args.out:
        print(md)
        print("partial run (--only without --out): results not written", file=sys.stderr)
        return
    write_json(f"{out_name}.json", {"machine": where, "rows": rows, "summary": summary})
    write_md(out_name + ".md", md)


if __name__ == "__main__":
    main()
