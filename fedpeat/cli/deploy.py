"""Run the app as a real deployment on loopback: one SuperLink, N SuperNodes, `flwr run`.

Each SuperNode is a separate edge device with its own node config (partition and profile); the
ClientApp runs in a fresh process every round, as on real devices. The command waits for the
run to finish (polling its status: `flwr run` exits 0 on failure), then stops every process it
started, and exits non-zero unless the run completed.

    python -m fedpeat.cli.deploy --nodes 2 --overrides "model=tiny_llama rounds=2" \\
        --node-config "memory-mb=900 distance-m=80" --node-config "memory-mb=600 gflops=5"
    python -m fedpeat.cli.deploy --nodes 2 --secure ...   # TLS and SuperNode authentication

`--node-config` (repeatable, the i-th for node i) adds to the partition the command assigns
(`partition-id=i num-partitions=N`); keys a node may set about itself: memory-mb (a cap on the
memory it detects), gflops, bandwidth-mhz, power-dbm, distance-m, profile (a name). Unless the
overrides choose `devices=`, the run uses `devices=nodes`: budgets come from the nodes.
`--secure` makes a CA, a server certificate for 127.0.0.1 and a key pair per node
(`fedpeat.cli.certs`), starts the SuperLink with TLS and `--enable-supernode-auth`, registers each
node's public key, and starts the SuperNodes with the CA and their private key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from fedpeat.cli.certs import make_credentials
from fedpeat.cli.flower import (
    PROJECT_DIR,
    SuperLink,
    SuperNode,
    Tls,
    connection_name,
    flwr_cli,
    flwr_env,
    remove_connection,
    stop_all,
    stop_marked,
    write_connection,
)
from fedpeat.cli.launch import Outcome, follow_run, outcome_of, report, resumed_dir, submit


def _toml_value(value: str) -> str:
    """A node-config value as Flower parses it (TOML): numbers and booleans as they are,
    anything else quoted (`profile=near` becomes `profile="near"`)."""
    if value in ("true", "false") or (value[:1] == value[-1:] and value[:1] in "\"'" and value):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return json.dumps(value)


def node_configs(nodes: int, extra: list[str]) -> list[str]:
    """Each node's `--node-config`: its partition, then what the user gave for it."""
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    if len(extra) > nodes:
        raise ValueError(f"{len(extra)} --node-config values for {nodes} node(s)")
    out = []
    for i in range(nodes):
        pairs = [f"partition-id={i}", f"num-partitions={nodes}"]
        for item in (extra[i] if i < len(extra) else "").split():
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"--node-config {extra[i]!r}: {item!r} is not key=value")
            if key in ("partition-id", "num-partitions"):
                raise ValueError(f"--node-config {extra[i]!r}: the command assigns {key}")
            pairs.append(f"{key}={_toml_value(value)}")
        out.append(" ".join(pairs))
    return out


def deployment_overrides(overrides: str, nodes: int) -> str:
    """The run waits for every node, and takes budgets from the nodes unless told otherwise."""
    words = overrides.split()
    extra = [] if any(w.startswith("devices=") for w in words) else ["devices=nodes"]
    if not any(w.startswith("strategy.min_nodes=") for w in words):
        extra.append(f"strategy.min_nodes={nodes}")
    return " ".join([*extra, *words])


def _supervise(
    supernodes: list[SuperNode], start: Callable[[int], SuperNode], restarts: list[int]
) -> str | None:
    """Why the run cannot go on: a SuperNode that exited (its log says why) with no restart
    left. One with restarts left (`restarts[i]`) is started again with the same config and
    key, as a device's supervisor would: the run goes on and the node rejoins."""
    for i, node in enumerate(supernodes):
        if node.proc.poll() is None:
            continue
        if restarts[i] <= 0:
            return f"SuperNode exited with code {node.proc.returncode}; see {node.out_file}"
        restarts[i] -= 1
        print(f"[fedpeat] SuperNode {i} exited ({node.proc.returncode}); restarting it", flush=True)
        supernodes[i] = start(i)
    return None


def register_node(public_key: Path, connection: str, env: dict[str, str]) -> int:
    """Register a SuperNode's public key with the SuperLink; its node id."""
    res = flwr_cli(["supernode", "register", str(public_key), connection, "--format", "json"], env)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = {}
    if not data.get("success"):
        raise RuntimeError(f"could not register {public_key}:\n{res.stdout}\n{res.stderr}")
    return int(data["node-id"])


def deploy(
    nodes: int,
    overrides: str = "",
    extra_node_config: list[str] | None = None,
    secure: bool = False,
    output_dir: Path | None = None,
    timeout_s: float = 3 * 3600,
    flwr_home: Path | None = None,
    stream: bool = True,
    app_dir: Path = PROJECT_DIR,
    device_cache_dir: Path | None = None,
    restarts: int = 0,
) -> Outcome:
    """Run the app once on a loopback deployment and return how it ended. The nodes keep their
    emulators under `device_cache_dir` (default: $FEDPEAT_DEVICE_CACHE_DIR, else the project's
    cache), each in its own `device-<partition>` directory. `restarts`: how many times a node
    that exits is started again before the run is stopped."""
    from fedpeat.config import compose, resolve_paths

    configs = node_configs(nodes, extra_node_config or [])
    overrides = deployment_overrides(overrides, nodes)
    workdir = Path.cwd()
    cfg = resolve_paths(compose(overrides), workdir)  # bad overrides fail here, before any process
    flwr_home = (flwr_home or Path(os.environ.get("FLWR_HOME", PROJECT_DIR / ".flwr"))).resolve()
    output_dir = (output_dir or workdir / "runs").resolve()
    marker = uuid.uuid4().hex
    env = flwr_env(flwr_home, marker)
    if device_cache_dir is not None:
        env["FEDPEAT_DEVICE_CACHE_DIR"] = str(device_cache_dir.resolve())
    scratch = flwr_home / f"deploy-{marker[:12]}"  # node logs, and keys in secure mode
    scratch.mkdir(parents=True)
    creds = make_credentials(scratch / "keys", "127.0.0.1", nodes) if secure else None
    tls = Tls(creds.ca_cert, creds.server_cert, creds.server_key) if creds else None
    superlink = SuperLink(flwr_home, env, simulation=False, tls=tls, node_auth=secure)
    supernodes: list[SuperNode] = []
    run_id: int | None = None
    status = "not started"
    try:
        superlink.wait_ready()
        write_connection(flwr_home, superlink.port, tls.ca_cert if tls else None)
        connection = connection_name(superlink.port)

        def start(i: int) -> SuperNode:
            key = creds.node_keys[i] if creds else None
            cert = tls.ca_cert if tls else None
            return SuperNode(superlink.port, configs[i], env, scratch, cert, key)

        for i in range(nodes):
            if creds:
                register_node(creds.node_keys[i].with_suffix(".pub"), connection, env)
            supernodes.append(start(i))
        left = [restarts] * nodes
        run_config = {
            "overrides": overrides,
            "output-dir": str(output_dir),
            "workdir": str(workdir),
        }
        run_id = submit(app_dir, env, run_config, {}, flwr_home, connection)
        print(f"[fedpeat] run {run_id} submitted to {nodes} SuperNode(s)", flush=True)
        status = follow_run(
            run_id, env, connection, timeout_s, stream, lambda: _supervise(supernodes, start, left)
        )
    finally:
        stop_all([*supernodes, superlink])
        remove_connection(flwr_home, superlink.port)
        stop_marked(marker)  # SuperExec and ClientApp processes outside the groups
        if status.startswith("finished:completed"):
            shutil.rmtree(scratch, ignore_errors=True)  # keys and node logs of a good run
    return outcome_of(run_id, status, output_dir, marker, resumed_dir(cfg.resume, workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (edge devices)")
    parser.add_argument("--overrides", default="", help="Hydra overrides")
    parser.add_argument(
        "--node-config", action="append", default=[], help="extra node config for node i"
    )
    parser.add_argument("--secure", action="store_true", help="TLS and SuperNode authentication")
    parser.add_argument("--output-dir", type=Path, default=None, help="where runs/<id>/ goes")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds before stop")
    parser.add_argument("--no-stream", action="store_true", help="do not stream the run's log")
    parser.add_argument(
        "--restarts",
        type=int,
        default=0,
        help="times a SuperNode that exits is started again (it rejoins) before the run stops",
    )
    args = parser.parse_args(argv)
    try:
        outcome = deploy(
            args.nodes,
            args.overrides,
            args.node_config,
            args.secure,
            args.output_dir,
            args.timeout,
            stream=not args.no_stream,
            restarts=args.restarts,
        )
    except Exception as err:  # a clear one-line reason, not a traceback
        print(f"[fedpeat] error: {err}", file=sys.stderr)
        return 2
    return report(outcome)


if __name__ == "__main__":
    sys.exit(main())
