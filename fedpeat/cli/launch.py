"""Run the app under `flwr run` in local Ray simulation, wait for it, and report the outcome.

`flwr run` returns as soon as the run is submitted and exits 0 even when the run fails, and the
SuperLink it would start on its own outlives it. So this launcher starts its own SuperLink on a
free loopback port (project-local FLWR_HOME, no runtime dependency installation), submits the
run, streams its log, polls the run status until it is finished, stops every process it started
(by process group), and exits non-zero unless the run completed and wrote its summary.

    python -m fedpeat.cli.launch --devices 6 --overrides "model=tiny_llama rounds=2"
    python -m fedpeat.cli.launch --check --overrides "..."   # validate and print, start nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeat.cli.flower import (
    CONNECTION,
    PROJECT_DIR,
    SuperLink,
    connection_name,
    flwr_bin,
    flwr_cli,
    flwr_env,
    remove_connection,
    run_status,
    stop_marked,
    toml_str,
    write_connection,
)
from fedpeat.config import Config, to_yaml


@dataclass
class Outcome:
    run_id: int | None
    status: str
    run_dir: Path | None
    summary: dict[str, Any] | None
    marker: str = ""
    """Environment marker carried by every process the launch started."""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and self.summary is not None


def submit(
    app_dir: Path,
    env: dict[str, str],
    run_config: dict[str, str],
    federation: dict[str, Any],
    flwr_home: Path,
    connection: str = CONNECTION,
) -> int:
    cfg_file = flwr_home / f"run-config-{os.getpid()}.toml"
    cfg_file.write_text("".join(f"{k} = {toml_str(v)}\n" for k, v in run_config.items()))

    def toml_value(v: Any) -> str:
        # Flower wants integral resources as TOML integers (1, not 1.0).
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return json.dumps(v) if isinstance(v, str) else str(v)

    fed = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
    # Deployment has no federation options: the SuperNodes are whoever connected.
    fed_args = ["--federation-config", fed] if fed else []
    args = ["run", str(app_dir), connection, "--run-config", str(cfg_file), *fed_args]
    res = flwr_cli(
        [*args, "--format", "json"],
        env,
        timeout=300,
    )
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = {}
    if not data.get("success") or not data.get("run-id"):
        raise RuntimeError(f"flwr run failed to submit the run:\n{res.stdout}\n{res.stderr}")
    return int(data["run-id"])


def follow_run(
    run_id: int,
    env: dict[str, str],
    connection: str,
    timeout_s: float,
    stream: bool = True,
    broken: Callable[[], str | None] = lambda: None,
) -> str:
    """Stream the run's log (optional) and poll its status until it has finished, `timeout_s`
    passed or `broken()` names a reason it cannot finish (then stop it); the last status."""
    log_proc = (
        subprocess.Popen([flwr_bin("flwr"), "log", str(run_id), connection, "--stream"], env=env)
        if stream
        else None
    )
    status = "unknown"
    try:
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        while (now := time.monotonic()) < deadline:
            # Each `flwr list` costs a second of CPU: ask rarely while the log stream (which ends
            # with the run) is alive, often once it has ended.
            streaming = log_proc is not None and log_proc.poll() is None
            if now >= next_check:
                status = run_status(run_id, env, connection)
                if status.startswith("finished"):
                    return status
                next_check = now + (20.0 if streaming else 3.0)
            if reason := broken():
                flwr_cli(["stop", str(run_id), connection], env)
                return f"stopped: {reason}"
            time.sleep(0.5)
        flwr_cli(["stop", str(run_id), connection], env)
        return f"timed out after {timeout_s:.0f}s (last status {status})"
    finally:
        if log_proc is not None:
            time.sleep(2.0)  # let the stream print the last lines
            log_proc.terminate()
            try:
                log_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log_proc.kill()


def check(devices: int, overrides: str = "") -> Config:
    """What `launch` checks before it starts anything (the overrides compose and validate, the
    data reads, every device gets a partition); returns the resolved config."""
    from fedpeat.config import compose, resolve_paths
    from fedpeat.data import partition_sizes

    cfg = resolve_paths(compose(overrides), Path.cwd())
    partition_sizes(cfg.data, cfg.partition, devices)
    return cfg


def launch(
    devices: int,
    overrides: str = "",
    output_dir: Path | None = None,
    cpus_per_device: float = 1.0,
    gpus_per_device: float = 0.0,
    timeout_s: float = 3 * 3600,
    flwr_home: Path | None = None,
    stream: bool = True,
    app_dir: Path = PROJECT_DIR,
    ray_address: str = "",
) -> Outcome:
    """Run the app once in local simulation and return how it ended. `ray_address`: a running
    Ray cluster's (`ray start --head` prints it) for the simulation to join, spreading the
    devices over every node's resources; empty: a Ray instance of its own on this machine."""
    workdir = Path.cwd()
    # Bad overrides, unreadable data and impossible partitions fail here, before any process.
    cfg = check(devices, overrides)
    flwr_home = (flwr_home or Path(os.environ.get("FLWR_HOME", PROJECT_DIR / ".flwr"))).resolve()
    output_dir = (output_dir or workdir / "runs").resolve()
    marker = uuid.uuid4().hex
    env = flwr_env(flwr_home, marker)
    if ray_address:  # Flower's backend calls ray.init(), which joins the cluster RAY_ADDRESS names
        env["RAY_ADDRESS"] = ray_address
    superlink = SuperLink(flwr_home, env)
    run_id: int | None = None
    status = "not started"
    try:
        superlink.wait_ready()
        write_connection(flwr_home, superlink.port)
        connection = connection_name(superlink.port)
        run_id = submit(
            app_dir,
            env,
            {"overrides": overrides, "output-dir": str(output_dir), "workdir": str(workdir)},
            {
                "num-supernodes": devices,
                "client-resources-num-cpus": cpus_per_device,
                "client-resources-num-gpus": gpus_per_device,
            },
            flwr_home,
            connection,
        )
        print(f"[fedpeat] run {run_id} submitted; SuperLink log: {superlink.log_file}", flush=True)
        status = follow_run(run_id, env, connection, timeout_s, stream)
    finally:
        superlink.stop()
        remove_connection(flwr_home, superlink.port)
        stop_marked(marker)  # SuperExec, simulation and Ray processes outside the group
    return outcome_of(run_id, status, output_dir, marker, resumed_dir(cfg.resume, workdir))


def resumed_dir(resume: str, workdir: Path) -> Path | None:
    """The run directory a `resume=<dir>` run continues in (it keeps that directory)."""
    if not resume:
        return None
    path = Path(resume)
    return path if path.is_absolute() else workdir / path


def outcome_of(
    run_id: int | None, status: str, output_dir: Path, marker: str, resumed: Path | None = None
) -> Outcome:
    run_dir = resumed if resumed is not None and resumed.is_dir() else None
    if run_dir is None and run_id is not None and output_dir.is_dir():
        matches = sorted(output_dir.glob(f"*-{run_id}"))
        run_dir = matches[-1] if matches else None
    summary = None
    if run_dir and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    return Outcome(run_id, status, run_dir, summary, marker)


def report(outcome: Outcome) -> int:
    """Print how a run ended (the error file of a failed one) and return the exit code."""
    if not outcome.ok:
        where = outcome.run_dir or "no run directory"
        print(
            f"[fedpeat] run {outcome.run_id} did not complete: {outcome.status} ({where})",
            file=sys.stderr,
        )
        if outcome.run_dir and (outcome.run_dir / "error.txt").is_file():
            print((outcome.run_dir / "error.txt").read_text(), file=sys.stderr)
        return 1
    s = outcome.summary or {}
    print(
        f"[fedpeat] run {outcome.run_id} completed: plug-in perplexity "
        f"{s['zero_shot_ppl']:.2f} (base) -> {s['final_plugin_ppl']:.2f} "
        f"after {s['rounds']} rounds in {s['wall_s']:.0f}s\n[fedpeat] results: {outcome.run_dir}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=6, help="simulated devices (SuperNodes)")
    parser.add_argument(
        "--overrides", default="", help="Hydra overrides, e.g. 'model=tiny_llama rounds=2'"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where runs/<id>/ goes (default ./runs)"
    )
    parser.add_argument(
        "--cpus-per-device", type=float, default=1.0, help="Ray CPUs per simulated device"
    )
    parser.add_argument(
        "--gpus-per-device", type=float, default=0.0, help="Ray GPU fraction per device"
    )
    parser.add_argument(
        "--timeout", type=float, default=3 * 3600, help="seconds before the run is stopped"
    )
    parser.add_argument("--no-stream", action="store_true", help="do not stream the run's log")
    parser.add_argument(
        "--ray-address",
        default="",
        help="join this running Ray cluster (HEAD:PORT) instead of starting Ray on this machine",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the overrides and data, print the resolved config, start nothing",
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            print(to_yaml(check(args.devices, args.overrides)), end="")
        except Exception as err:
            print(f"[fedpeat] error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        outcome = launch(
            args.devices,
            args.overrides,
            args.output_dir,
            args.cpus_per_device,
            args.gpus_per_device,
            args.timeout,
            stream=not args.no_stream,
            ray_address=args.ray_address,
        )
    except Exception as err:  # a clear one-line reason, not a launcher traceback
        print(f"[fedpeat] error: {err}", file=sys.stderr)
        return 2
    return report(outcome)


if __name__ == "__main__":
    sys.exit(main())
