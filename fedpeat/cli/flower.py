"""The Flower processes a local run needs, started and stopped by us: a SuperLink and
SuperNodes on free loopback ports (each in its own process group, marked so a stray one can be
found), the project-local `$FLWR_HOME/config.toml` connection, and `flwr` CLI calls."""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent.parent
CONNECTION = "fedpeat-local"
MARKER_VAR = "FEDPEAT_LAUNCH_ID"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_bin(name: str) -> str:
    """Console script from the same environment as this interpreter."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def toml_str(value: str) -> str:
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
    """The SuperLink's TLS files (`fedpeat.cli.certs` makes them)."""

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
            flwr_bin("flower-superlink"),
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
            flwr_bin("flower-supernode"),
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
        [flwr_bin("flwr"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> str:
    res = flwr_cli(["list", connection, "--run-id", str(run_id), "--format", "json"], env)
    try:
        data = json.loads(res.stdout)
        runs = data.get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"
