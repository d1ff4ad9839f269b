"""Federated runs side by side: time to target, communication, plug-in quality and overhead.

Runs the real ServerApp and ClientApp on the default model, data and devices:

  controllers  controller = ppo, greedy, random, fixed, each for every seed; one of them (fixed,
               first seed) under `flwr run` in Ray simulation, the others in-process (the same
               code path without Ray: a run gives the same metrics either way, and Ray's start
               and transport would cost minutes per run here)
  fed_ft       experiment=fed_ft (full model, full fine-tuning, FedAvg) for every seed, one round
               (it reaches the target in its first round; its time to target is that round's)
  case3        emulator.case=3: federated LoRA on the full model, first seed
  centralised  one LoRA on the full model trained on the pooled data of every device and the
               server, for as many steps as FedPEAT's (ppo) run took in all, per seed

From their metrics: modelled time and bytes until the plug-in perplexity first reaches
`target_ppl`, bytes per device per round, final plug-in perplexity against zero-shot, case 3
and the centralised bound, the emulator-vs-plug-in gap, and where a round's wall time goes.
Writes bench/results/{time_to_target,communication,quality}.md, federated.json (with the
flwr run's round overhead; overhead.md is the default experiment's, bench.default_run) and
time_to_target.png, quality.png. Runs go to runs/bench/ (`--reuse` keeps completed ones).

    python -m bench.federated [--seeds 42,43] [--devices 6] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from bench.common import RESULTS, machine, write_json, write_md
from bench.federated_report import CONTROLLERS, device_steps, markdown, plots, report

RAY_RUN = "fixed"  # the controller whose first-seed run goes through flwr run (overhead)
RUNS_DIR = Path("runs") / "bench"
CONTROLLER_DIR = Path("runs") / "controller"


@dataclass
class Spec:
    name: str
    system: str
    overrides: str
    seed: int
    ray: bool = False


def plan_runs(seeds: list[int], base: str = "") -> list[Spec]:
    """Every run, `base` overrides first (a smaller model for a quick check). These tables
    compare the controllers without the planner (each device trains the global adapter)."""
    base = f"{base} planner=none".strip()
    out = [
        Spec(f"{c}-{s}", c, f"{base} controller={c} seed={s}", s, c == RAY_RUN and s == seeds[0])
        for s in seeds
        for c in CONTROLLERS
    ]
    out += [
        Spec(f"fed_ft-{s}", "fed_ft", f"{base} experiment=fed_ft seed={s} rounds=1", s)
        for s in seeds
    ]
    first = seeds[0]
    case3 = f"{base} emulator.case=3 controller=none seed={first}"
    out.append(Spec(f"case3-{first}", "case3", case3, first))
    return out


# ----------------------------------------------------------------------------- running


def run_inprocess(overrides: str, run_dir: Path, devices: int) -> None:
    """The ServerApp's run against an in-process grid (this process)."""
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from bench.inprocess import InProcessGrid
    from fedpeat.config import compose, resolve_paths
    from server_app.app import _checkpoint, _run

    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    cfg = resolve_paths(compose(overrides), Path.cwd())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overrides.txt").write_text(overrides + "\n")
    grid = cast(Grid, InProcessGrid(devices))  # Flower's Grid in all the ServerApp uses
    _run(grid, cfg, run_dir, _checkpoint(cfg, Path.cwd()))


def pretrain_controller(threads: int) -> None:
    """Pre-train the PPO policy the ppo runs start from and compare the controllers on the
    edge-system environment (`make pretrain`); copies its table and curve to bench/results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for command in ("pretrain", "compare"):
        cmd = [sys.executable, "-m", "strategies.control", command, "--out", str(CONTROLLER_DIR)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"strategies.control {command} failed:\n{out.stderr[-3000:]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONTROLLER_DIR / "compare.md", RESULTS / "controller_compare.md")
    shutil.copy(CONTROLLER_DIR / "pretrain_curve.png", RESULTS / "controller_pretrain.png")


def execute(spec: Spec, devices: int, reuse: bool, threads: int = 0) -> Path:
    """Run `spec` (in a process of its own, with `threads` torch threads; 0: torch's default)
    unless `reuse` finds it completed; its run dir."""
    run_dir = (RUNS_DIR / spec.name).resolve()
    if reuse and (run_dir / "summary.json").is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    disks = run_dir.with_name(spec.name + "-disks")
    env = {**os.environ, "FEDPEAT_DEVICE_CACHE_DIR": str(disks)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    shutil.rmtree(disks, ignore_errors=True)
    try:
        return _run(spec, devices, run_dir, env)
    finally:
        # The devices' simulated disks (the emulators they cached, near 1 GB a run) serve only
        # the run itself: kept, a whole `make bench` would leave tens of GB behind.
        shutil.rmtree(disks, ignore_errors=True)


def _run(spec: Spec, devices: int, run_dir: Path, env: dict[str, str]) -> Path:
    if spec.ray:
        from fedpeat.cli.launch import launch

        before = os.environ.get("FEDPEAT_DEVICE_CACHE_DIR")
        os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = env["FEDPEAT_DEVICE_CACHE_DIR"]
        try:
            outcome = launch(devices, spec.overrides, RUNS_DIR.resolve() / "ray", stream=False)
        finally:
            if before is None:
                os.environ.pop("FEDPEAT_DEVICE_CACHE_DIR", None)
            else:
                os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = before
        if not outcome.ok or outcome.run_dir is None:
            raise RuntimeError(f"{spec.name} under flwr run: {outcome.status}")
        shutil.move(str(outcome.run_dir), run_dir)
        (run_dir / "overrides.txt").write_text(spec.overrides + "\n")
        return run_dir
    cmd = [sys.executable, "-m", "bench.federated", "--child", spec.overrides, str(run_dir)]
    cmd += ["--devices", str(devices)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"{spec.name} failed:\n{out.stderr[-3000:]}")
    return run_dir


def load_run(run_dir: Path) -> dict[str, Any]:
    from fedpeat.outputs import read_metrics

    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "rows": read_metrics(run_dir / "metrics.jsonl"),
    }


def centralised(overrides: str, steps: int, seed: int, devices: int) -> dict[str, Any]:
    """The upper bound: one LoRA on the full model trained on the pooled training data of all
    devices and the server for `steps` steps (same batch, rate and adapter), then evaluated on the
    server's held-out set like every plug-in model."""
    from dataclasses import replace

    from fedpeat.config import compose
    from fedpeat.data import device_data, encode, server_train_data
    from fedpeat.server_model import ServerModel

    cfg = compose(f"{overrides} seed={seed}")
    cfg = replace(cfg, train=replace(cfg.train, local_steps=steps))
    server = ServerModel(cfg)
    pooled = server_train_data(cfg.data)
    for i in range(devices):
        pooled += device_data(cfg.data, cfg.partition, i, devices).train
    server.train_data = encode(pooled, server.tokenizer, cfg.data.max_length)
    began = time.perf_counter()
    state, result, _ = server.train(server.initial_state, 1)
    ppl = server.evaluate(state).ppl
    return {
        "seed": seed,
        "steps": steps,
        "examples": len(server.train_data),
        "ppl": ppl,
        "train_loss": result.train_loss,
        "wall_s": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None, help="Ray's parallel devices")
    parser.add_argument("--reuse", action="store_true", help="keep completed runs in runs/bench")
    parser.add_argument("--base", default="", help="overrides before every run's own")
    parser.add_argument("--parallel", type=int, default=2, help="in-process runs at once")
    parser.add_argument(
        "--pretrain", action="store_true", help="pre-train the PPO policy first (make bench)"
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_inprocess(args.child[0], Path(args.child[1]), args.devices)
        return
    from fedpeat.config import compose

    seeds = [int(s) for s in args.seeds.split(",")]
    specs = plan_runs(seeds, args.base)
    for spec in specs:  # every configuration composes before anything runs
        compose(spec.overrides)
    cfg = compose(args.base)
    runs: dict[str, dict[str, Any]] = {}
    began = time.perf_counter()
    done = 0

    def finish(spec: Spec, run_dir: Path) -> None:
        nonlocal done
        runs[spec.name] = load_run(run_dir)
        done += 1
        s = runs[spec.name]["summary"]
        print(
            f"[federated {done}/{len(specs)}] {spec.name}{' (flwr run)' if spec.ray else ''}: "
            f"ppl {s['zero_shot_ppl']:.2f} -> {s['final_plugin_ppl']:.2f}, time to target "
            f"{s['time_to_target_s']}, run wall {s['wall_s']:.0f}s "
            f"(bench {time.perf_counter() - began:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    # In-process runs two at a time with one torch thread each (a run has long single-threaded
    # stretches: messages, packaging, evaluation set-up); the PPO runs queue behind the policy's
    # pre-training. The flwr run goes alone afterwards, so its timings (the overhead table) are
    # not shared with another run.
    parallel = max(1, args.parallel)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else 0
    with ThreadPoolExecutor(parallel) as pool:
        pre = pool.submit(pretrain_controller, threads or 1) if args.pretrain else None
        order = [sp for sp in specs if not sp.ray and sp.system != "ppo"]
        order += [sp for sp in specs if not sp.ray and sp.system == "ppo"]

        def job(spec: Spec) -> tuple[Spec, Path]:
            if spec.system == "ppo" and pre is not None:
                pre.result()
            return spec, execute(spec, args.devices, args.reuse, threads)

        futures = [pool.submit(job, sp) for sp in order]
        for future in as_completed(futures):
            finish(*future.result())
    for spec in specs:
        if spec.ray:
            finish(spec, execute(spec, args.devices, args.reuse))
    steps = [
        device_steps(runs[sp.name]["rows"], cfg.train.local_steps, cfg.strategy.server_train)
        for sp in specs
        if sp.system == "ppo"
    ]
    central = []
    for sp, n in zip([sp for sp in specs if sp.system == "ppo"], steps, strict=True):
        central.append(centralised(args.base, n, sp.seed, args.devices))
        print(
            f"[federated] centralised seed {sp.seed}, {n} steps: ppl {central[-1]['ppl']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    workers = args.workers or max(1, min(args.devices, os.cpu_count() or 1))
    rep = report(runs, specs, central, cfg.controller.target_ppl, workers)
    where = machine()
    texts = markdown(rep, where)
    for name, text in texts.items():
        if name == "overhead":  # overhead.md is the default experiment's (bench.default_run)
            continue
        write_md(f"{name}.md", text + ("" if name == "time_to_target" else f"\n\n{where}"))
    write_json("federated.json", {"machine": where, "seeds": seeds, **rep})
    plots(rep, runs, specs)


if __name__ == "__main__":
    main()
