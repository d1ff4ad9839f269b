"""Run the app under `flwr run` in local Ray simulation, wait for it, and report the outcome.

`flwr run` returns as soon as the run is submitted and exits 0 even when the run fails, and the
SuperLink it would start on its own outlives it. So this launcher starts its own SuperLink on a
free loopback port (project-local FLWR_HOME, no runtime dependency installation), submits the
run, streams its log, polls the run status until it is finished, stops every process it started
(by process group), and exits non-zero unless the run completed and wrote its summary.

    python -m fedpeat.launch --devices 6 --overrides "model=tiny_llama rounds=2"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedpeat-local"
MARKER_VAR = "FEDPEAT_LAUNCH_ID"


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """Console script from the same environment as this interpreter."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def flwr_env(flwr_home: Path, marker: str) -> dict[str, str]:
    """Environment of every process we start; `marker` lets us find them all again.

    The SuperLink detaches its SuperExec into a new session, so a process group does not hold
    all of them; every descendant inherits this environment, though.
    """
    env = dict(os.environ)
    env[MARKER_VAR] = marker
    # flower-superlink starts flower-superexec and flwr-simulation by name: put our venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("FEDPEAT_CACHE_DIR", str(PROJECT_DIR / ".cache" / "fedpeat"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def connection_name(port: int) -> str:
    """One named connection per SuperLink: launches that share a Flower home (a sweep next to a
    test run) must not point each other's `flwr` calls at the wrong SuperLink."""
    return f"{CONNECTION}-{port}"


def _edit_connections(flwr_home: Path, port: int, add: bool, root_cert: Path | None = None) -> None:
    """Add (or remove) this SuperLink's connection in config.toml under a file lock, keeping
    the other launches' entries; the file is replaced atomically."""
    import fcntl
    import tomllib

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    with open(flwr_home / "config.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = tomllib.loads(path.read_text()).get("superlink", {}) if path.exists() else {}
        except tomllib.TOMLDecodeError:
            entries = {}
        entries = {k: v for k, v in entries.items() if isinstance(v, dict)}
        name = connection_name(port)
        if add:
            entries[name] = (
                {"address": f"127.0.0.1:{port}", "root-certificates": str(root_cert)}
                if root_cert
                else {"address": f"127.0.0.1:{port}", "insecure": True}
            )
        else:
            entries.pop(name, None)
        default = name if add else next(iter(entries), CONNECTION)
        text = f"[superlink]\ndefault = {json.dumps(default)}\n"
        for key, values in entries.items():
            text += f"\n[superlink.{key}]\n" + "".join(
                f"{k} = {json.dumps(v) if isinstance(v, (str, bool)) else v}\n"
                for k, v in values.items()
            )
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def write_connection(flwr_home: Path, port: int, root_cert: Path | None = None) -> None:
    """Name this SuperLink in config.toml (TLS with `root_cert`, else insecure)."""
    _edit_connections(flwr_home, port, True, root_cert)


def remove_connection(flwr_home: Path, port: int) -> None:
    _edit_connections(flwr_home, port, add=False)


@dataclass(frozen=True)
class Tls:
    """The SuperLink's TLS files (`fedpeat.certs` makes them)."""

    ca_cert: Path
    cert: Path
    key: Path


class _Process:
    """A process we start in its own group (its children join it) and stop with the group."""

    proc: subprocess.Popen[bytes]
    out_file: Path

    def _start(self, cmd: list[str], env: dict[str, str], out_file: Path) -> None:
        self.out_file = out_file
        with out_file.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left."""
        stop_all([self])


def stop_all(processes: list[_Process], grace_s: float = 15.0) -> None:
    """SIGTERM every process group at once, wait up to `grace_s` for all of them together, then
    SIGKILL what is left (one shared grace period, not one per process)."""
    for p in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(_group_alive(p.proc.pid) for p in processes):
        time.sleep(0.3)
    for p in processes:
        if _group_alive(p.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGKILL)
        if p.proc.poll() is None:
            p.proc.wait(timeout=5)


class SuperLink(_Process):
    """A SuperLink we own on a free loopback port: simulation (Ray runs the devices) or
    deployment (SuperNodes connect), with TLS and SuperNode authentication when asked."""

    def __init__(
        self,
        flwr_home: Path,
        env: dict[str, str],
        simulation: bool = True,
        tls: Tls | None = None,
        node_auth: bool = False,
    ) -> None:
        self.port = free_port()
        self.tls = tls
        flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_file = flwr_home / f"superlink-{self.port}.log"
        security = ["--insecure"]
        if tls:
            security = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert)]
            security += ["--ssl-keyfile", str(tls.key)]
        cmd = [
            _bin("flower-superlink"),
            *security,
            *(["--simulation"] if simulation else []),
            *(["--enable-supernode-auth"] if node_auth else []),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-file",
            str(self.log_file),
        ]
        self._start(cmd, env, flwr_home / f"superlink-{self.port}.out")

    def wait_ready(self, timeout: float = 60.0) -> None:
        scheme, context = "http", None
        if self.tls:
            import ssl

            scheme, context = "https", ssl.create_default_context(cafile=str(self.tls.ca_cert))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.out_file.read_text(errors="replace")[-4000:]
                if "address already in use" in tail:
                    raise RuntimeError(
                        f"SuperLink could not listen on 127.0.0.1:{self.port}: address already "
                        f"in use (another process took the port); run again, or free it; "
                        f"see {self.out_file}"
                    )
                raise RuntimeError(
                    f"SuperLink exited with code {self.proc.returncode}; see {self.out_file}"
                )
            try:
                url = f"{scheme}://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=1, context=context):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"SuperLink not ready on port {self.port} after {timeout:.0f}s")


class SuperNode(_Process):
    """One edge device: a SuperNode connected to `superlink_port` on loopback."""

    def __init__(
        self,
        superlink_port: int,
        node_config: str,
        env: dict[str, str],
        log_dir: Path,
        root_cert: Path | None = None,
        auth_key: Path | None = None,
    ) -> None:
        self.port = free_port()  # its ClientApp runtime API
        cmd = [
            _bin("flower-supernode"),
            *(["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]),
            *(["--auth-supernode-private-key", str(auth_key)] if auth_key else []),
            "--superlink",
            f"127.0.0.1:{superlink_port}",
            "--port",
            str(self.port),
            "--node-config",
            node_config,
            "--max-wait-time",
            "120",
        ]
        self._start(cmd, env, log_dir / f"supernode-{self.port}.out")


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries `MARKER_VAR=marker` (Linux /proc)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_marked(marker: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every marked process, SIGKILL the ones still alive after `grace_s`."""
    pids = marked_pids(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and marked_pids(marker):
        time.sleep(0.3)
    for pid in marked_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def flwr_cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> str:
    res = flwr_cli(["list", connection, "--run-id", str(run_id), "--format", "json"], env)
    try:
        data = json.loads(res.stdout)
        runs = data.get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"


def submit(
    app_dir: Path,
    env: dict[str, str],
    run_config: dict[str, str],
    federation: dict[str, Any],
    flwr_home: Path,
    connection: str = CONNECTION,
) -> int:
    cfg_file = flwr_home / f"run-config-{os.getpid()}.toml"
    cfg_file.write_text("".join(f"{k} = {_toml_str(v)}\n" for k, v in run_config.items()))

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
        subprocess.Popen([_bin("flwr"), "log", str(run_id), connection, "--stream"], env=env)
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
) -> Outcome:
    """Run the app once in local simulation and return how it ended."""
    from fedpeat.config import compose, resolve_paths
    from fedpeat.data import partition_sizes

    workdir = Path.cwd()
    # Bad overrides, unreadable data and impossible partitions fail here, before any process.
    cfg = resolve_paths(compose(overrides), workdir)
    partition_sizes(cfg.data, cfg.partition, devices)
    flwr_home = (flwr_home or Path(os.environ.get("FLWR_HOME", PROJECT_DIR / ".flwr"))).resolve()
    output_dir = (output_dir or workdir / "runs").resolve()
    marker = uuid.uuid4().hex
    env = flwr_env(flwr_home, marker)
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
    args = parser.parse_args(argv)
    try:
        outcome = launch(
            args.devices,
            args.overrides,
            args.output_dir,
            args.cpus_per_device,
            args.gpus_per_device,
            args.timeout,
            stream=not args.no_stream,
        )
    except Exception as err:  # a clear one-line reason, not a launcher traceback
        print(f"[fedpeat] error: {err}", file=sys.stderr)
        return 2
    return report(outcome)


if __name__ == "__main__":
    sys.exit(main())
