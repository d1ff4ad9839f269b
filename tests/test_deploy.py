"""Real loopback deployments: a SuperLink and SuperNodes (a fresh ClientApp process each round),
plain and with TLS and SuperNode authentication."""

from __future__ import annotations

import json

import pytest

from fedpeat.cli.certs import make_credentials
from fedpeat.cli.deploy import deploy, deployment_overrides, node_configs
from fedpeat.cli.flower import marked_pids
from tests.helpers import pids_under


def test_node_configs_assign_partitions_and_keep_the_users_figures() -> None:
    assert node_configs(2, ["memory-mb=900 profile=near gpu=true name='x'"]) == [
        "partition-id=0 num-partitions=2 memory-mb=900 profile=\"near\" gpu=true name='x'",
        "partition-id=1 num-partitions=2",
    ]
    with pytest.raises(ValueError, match="3 --node-config values for 2 node"):
        node_configs(2, ["a=1", "b=2", "c=3"])
    with pytest.raises(ValueError, match="the command assigns partition-id"):
        node_configs(1, ["partition-id=4"])
    with pytest.raises(ValueError, match="'memory' is not key=value"):
        node_configs(1, ["memory"])
    assert deployment_overrides("rounds=2", 3) == "devices=nodes strategy.min_nodes=3 rounds=2"
    assert deployment_overrides("devices=tiers", 2) == "strategy.min_nodes=2 devices=tiers"


def _rows(outcome) -> list[dict]:
    assert outcome.ok, f"{outcome.status}: {outcome.run_dir}"
    assert marked_pids(outcome.marker) == []  # no process the deployment started is left
    for name in ("summary.json", "ppl.png", "adapter/adapter_model.safetensors"):
        assert (outcome.run_dir / name).is_file(), name
    return [json.loads(x) for x in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]


def _deploy(where, node_config: list[str], secure: bool = False, rounds: int = 2):
    return deploy(
        len(node_config),
        # No device-side evaluation: each one would start another ClientApp process per node.
        f"experiment=tiny emulator.case=1 strategy.fraction_evaluate=0 rounds={rounds}",
        node_config,
        secure=secure,
        output_dir=where / "runs",
        flwr_home=where / "flwr",
        stream=False,
        device_cache_dir=where / "devices",
    )


def _check_caching_and_profiles(rows: list[dict], clients: int = 2) -> None:
    assert [r["num_clients"] for r in rows] == [0, clients, clients][: len(rows)]
    assert rows[1]["exchanges"] == clients and rows[1]["emulator_bytes"] > 0
    if len(rows) > 2:
        # Every round's ClientApp process is fresh, yet round 2 sends no emulator: the nodes'
        # disk caches hold it.
        assert rows[2]["exchanges"] == 0 and rows[2]["emulator_bytes"] == 0
    # The profiles came from the nodes: their configured budgets and figures, the rest flagged.
    profiles = {p["profile"]: p for p in rows[1]["profiles"].values()}
    assert profiles["near"]["memory_mb"] == 4000 and profiles["near"]["distance_m"] == 50
    assert profiles["far"]["gflops"] == 5 and "gflops" not in profiles["far"]["assumed"]
    assert "gflops" in profiles["near"]["assumed"]
    assert profiles["far"]["data-size"] > 0 and profiles["far"]["detected-memory-mb"] > 0
    assert all(r["plugin_ppl"] < rows[0]["plugin_ppl"] for r in rows[1:])


NEAR, FAR = "memory-mb=4000 distance-m=50 profile=near", "memory-mb=3000 gflops=5 profile=far"
PRIVATE_ROWS = (24, 36, 48)  # each node's own file: sizes differ, so data-size tells them apart


def _private_files(where) -> list:
    """Three nodes' own JSONL files (text rows, as the tiny experiment's plain-text data),
    each in a directory of its own, none of them the server's corpus."""
    from fedpeat.config import compose
    from fedpeat.data import load_samples

    texts = [s["response"] for s in load_samples(compose("experiment=tiny").data)]
    paths, start = [], 0
    for i, n in enumerate(PRIVATE_ROWS):
        path = where / f"partner-{i}" / "own.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[start : start + n]))
        paths.append(path)
        start += n
    return paths


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    """Both loopback deployments at once: they spend most of their time waiting for ClientApp
    processes to start, so running them side by side halves the suite's wall time."""
    from concurrent.futures import ThreadPoolExecutor

    plain, secure = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("secure")
    own = _private_files(secure)
    private = [f"{NEAR} data-path='{own[0]}'", f"{FAR} data-path='{own[1]}'"]
    private.append(f"profile=third data-path='{own[2]}'")
    with ThreadPoolExecutor(2) as pool:
        # Two devices with different profiles, and a third whose budget fits no emulator.
        a = pool.submit(_deploy, plain, [NEAR, FAR, "memory-mb=1 profile=tiny-budget"])
        # TLS and node authentication, each partner training on its own private file.
        b = pool.submit(_deploy, secure, private, True, 2)
        return {"plain": (plain, a.result()), "secure": (secure, b.result()), "own": own}


@pytest.mark.slow
def test_loopback_deployment_caches_emulators_and_skips_a_node_that_fits_none(deployments):
    _, outcome = deployments["plain"]
    rows = _rows(outcome)
    _check_caching_and_profiles(rows)
    node = next(n for n, p in rows[1]["profiles"].items() if p["profile"] == "tiny-budget")
    for row in rows[1:]:
        (skip,) = row["skipped"]
        assert str(skip["node"]) == node and "MB" in skip["reason"]


@pytest.mark.slow
def test_secure_deployment_of_partners_with_private_data(deployments):
    from fedpeat.config import compose
    from fedpeat.node_data import node_data

    where, outcome = deployments["secure"]
    rows = _rows(outcome)
    assert len(rows) == 3
    _check_caching_and_profiles(rows, clients=3)
    # Each node trained on its own file: the training examples it reported are its file's.
    data = compose("experiment=tiny").data
    own = {len(node_data(data, str(p)).train) for p in deployments["own"]}
    profiles = rows[1]["profiles"].values()
    assert {p["data-size"] for p in profiles} == own and len(own) == 3
    assert all(p["private-data"] for p in profiles)
    assert all(d["status"] == "ok" for r in rows[1:] for d in r["devices"])
    # Keys and certificates of a completed run are removed with its scratch directory.
    assert not list((where / "flwr").glob("deploy-*"))


@pytest.mark.slow
def test_superlink_refuses_a_supernode_whose_key_is_not_registered(tmp_path):
    """Node authentication is enforced: the same key is refused before `flwr supernode register`
    and accepted after it."""
    import time
    import uuid

    from fedpeat.cli.deploy import register_node
    from fedpeat.cli.flower import (
        SuperLink,
        SuperNode,
        Tls,
        connection_name,
        flwr_env,
        stop_all,
        stop_marked,
        write_connection,
    )

    marker = uuid.uuid4().hex
    env = flwr_env(tmp_path, marker)
    creds = make_credentials(tmp_path / "keys", "127.0.0.1", 1)
    tls = Tls(creds.ca_cert, creds.server_cert, creds.server_key)
    superlink = SuperLink(tmp_path, env, simulation=False, tls=tls, node_auth=True)
    started = [superlink]
    try:
        superlink.wait_ready()
        write_connection(tmp_path, superlink.port, tls.ca_cert)
        key, config = creds.node_keys[0], "partition-id=0 num-partitions=1"
        stranger = SuperNode(superlink.port, config, env, tmp_path, tls.ca_cert, key)
        started.append(stranger)
        assert stranger.proc.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in stranger.out_file.read_text()

        register_node(key.with_suffix(".pub"), connection_name(superlink.port), env)
        member = SuperNode(superlink.port, config, env, tmp_path, tls.ca_cert, key)
        started.append(member)
        time.sleep(8)  # long enough to have been refused, as the stranger was within seconds
        assert member.proc.poll() is None, member.out_file.read_text()[-2000:]
    finally:
        stop_all(started)
        stop_marked(marker)
    assert marked_pids(marker) == []


@pytest.mark.slow
def test_a_killed_supernode_restarts_rejoins_and_is_not_sent_its_emulator_again(tmp_path):
    import os
    import signal
    import threading
    import time

    home = (tmp_path / "flwr").resolve()
    out: dict = {}

    def run() -> None:
        out["outcome"] = deploy(
            2,
            "experiment=tiny emulator.case=1 strategy.fraction_evaluate=0 rounds=3 "
            "strategy.round_timeout_s=30",
            [NEAR, FAR],
            output_dir=tmp_path / "runs",
            flwr_home=home,
            stream=False,
            device_cache_dir=tmp_path / "devices",
            restarts=1,
        )

    runner = threading.Thread(target=run)
    runner.start()
    killed: list[int] = []
    deadline = time.monotonic() + 600
    while not killed and time.monotonic() < deadline and runner.is_alive():
        for metrics in (tmp_path / "runs").glob("*/metrics.jsonl"):
            if len(metrics.read_text().splitlines()) >= 2:  # round 1 is done: round 2 begins
                killed = pids_under(home, "flower-supernode", "partition-id=1")
        time.sleep(0.1)
    assert killed, "round 1 never finished, or node 1's SuperNode was not found"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    runner.join()
    rows = _rows(out["outcome"])
    by_round = [{d["partition"]: d for d in r["devices"]} for r in rows]
    # Round 2 lost node 1 (killed before it replied); it came back under a new node id.
    assert by_round[2][1]["status"] == "timeout" and by_round[2][0]["status"] == "ok"
    rejoined = [r["rejoined"] for r in rows if r["rejoined"]]
    assert len(rejoined) == 1
    ((new, old),) = rejoined[0].items()
    assert int(new) != old
    # It trained again in round 3 from its disk cache: the emulator was not sent again.
    assert by_round[3][1]["status"] == "ok" and by_round[3][1]["node"] == int(new)
    assert not by_round[3][1]["emulator_sent"] and rows[3]["emulator_bytes"] == 0
    assert rows[1]["emulator_bytes"] > 0
