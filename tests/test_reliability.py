"""Faults, outliers, memory budgets, differential privacy: whole runs of the real ServerApp path
against an in-process grid of real ClientApps, some of them made to misbehave."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from fedpeat.outputs import read_metrics
from fedpeat.protocol import ADAPTER_KEY
from server_app.app import _run
from strategies.privacy import epsilon, gaussian_rdp, rdp_to_epsilon

# Generous: an honest tiny device trains in about a second, but a loaded 2-core runner is slow.
ROUND_TIMEOUT_S = 15.0
HONEST = (0, 6, 7)


def _adapter(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content.array_records[ADAPTER_KEY].items()}


def _with_adapter(reply: Message, state: dict[str, np.ndarray]) -> Message:
    reply.content[ADAPTER_KEY] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return reply


def _misbehave(msg: Message, node: int, reply: Message) -> Message | None:
    """Partition 1 raises, 2 returns NaN, 3 wrong shapes, 4 an update scaled x1e4, 5 answers
    after the round's deadline."""
    if msg.metadata.message_type != "train" or reply.has_error():
        return reply
    pid, sent, got = node - 1000, _adapter(msg), _adapter(reply)
    first = next(iter(got))
    if pid == 1:
        raise RuntimeError("CUDA error: device-side assert triggered")
    if pid == 2:
        got[first] = np.full_like(got[first], np.nan)
    elif pid == 3:
        got[first] = np.zeros((got[first].shape[0] + 1, *got[first].shape[1:]), np.float32)
    elif pid == 4:
        got = {k: (sent[k] + 1e4 * (v - sent[k])).astype(np.float32) for k, v in got.items()}
    elif pid == 5:
        time.sleep(ROUND_TIMEOUT_S + 0.5)
    return _with_adapter(reply, got)


def _final_state(run_dir) -> dict[str, np.ndarray]:
    from server_app.checkpoint import load_checkpoint

    return {k: np.asarray(v) for k, v in load_checkpoint(run_dir).state.items()}


def test_faulty_devices_are_rejected_and_the_adapter_is_the_honest_ones(
    tmp_path, server_identity, device_disks
) -> None:
    overrides = [
        "experiment=tiny",
        "rounds=1",  # one round shows it; each round sleeps through the deadline once
        f"strategy.round_timeout_s={ROUND_TIMEOUT_S}",
        "strategy.min_nodes=1",
        "strategy.fraction_evaluate=0",
    ]
    cfg = compose(overrides)
    faulty = tmp_path / "faulty"
    faulty.mkdir()
    grid = InProcessGrid(9, tamper=_misbehave)

    def memory_taken(msg: Message, node: int) -> None:
        # Partition 8 profiled with room to spare; by training time something else took its
        # memory: only the device itself can notice, and it must refuse.
        if msg.metadata.message_type == "train" and node == 1008:
            grid.contexts[node].node_config["memory-mb"] = 1
        return None

    grid.fail = memory_taken
    _run(grid, cfg, faulty)
    rows = read_metrics(faulty / "metrics.jsonl")
    assert len(rows) == 2 and (faulty / "summary.json").is_file()
    for row in rows[1:]:
        reasons = {r["node"] - 1000: r["reason"] for r in row["rejected"]}
        assert sorted(reasons) == [1, 2, 3, 4, 5, 8], reasons
        assert "device error: RuntimeError: CUDA error" in reasons[1]
        assert "non-finite" in reasons[2]
        assert "shape" in reasons[3]
        assert "update norm" in reasons[4] and "x the round's median" in reasons[4]
        assert "no reply within strategy.round_timeout_s=15" in reasons[5]
        assert "memory budget 1 MB (node config memory-mb) <" in reasons[8]
        assert "estimated for this plan" in reasons[8]
        status = {d["partition"]: d["status"] for d in row["devices"]}
        assert [p for p, s in status.items() if s == "ok"] == list(HONEST)
        assert status[5] == "timeout" and status[4] == "rejected"
        assert row["num_clients"] == 3

    # The same run with only the honest devices (same partitions of the same split).
    honest = tmp_path / "honest"
    honest.mkdir()
    _run(InProcessGrid(9, partitions=HONEST), cfg, honest)
    want, got = _final_state(honest), _final_state(faulty)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
    assert read_metrics(honest / "metrics.jsonl")[-1]["rejected"] == []


def test_too_few_valid_replies_keep_the_adapter(tmp_path, server_identity, device_disks) -> None:
    cfg = compose(["experiment=tiny", "rounds=1", "strategy.min_replies=2", "strategy.min_nodes=1"])

    def one_fails(msg: Message, node: int, reply: Message) -> Message | None:
        if msg.metadata.message_type == "train" and node == 1001:
            raise RuntimeError("out of battery")
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(2, tamper=one_fails)
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    # one valid update < min_replies=2: the adapter stays the initial one (B = 0: base model)
    assert rows[1]["plugin_ppl"] == pytest.approx(rows[0]["plugin_ppl"], rel=1e-6)
    assert rows[1]["rejected"][0]["reason"].endswith("out of battery")


# ------------------------------------------------------------------ differential privacy


def test_rdp_accountant_by_hand() -> None:
    # sigma 2, 3 releases, order 5: 3 * 5 / (2 * 4) = 1.875
    assert gaussian_rdp(2.0, 3, 5.0) == pytest.approx(1.875)
    # 1.875 + ln(4/5) - (ln 1e-5 + ln 5) / 4 = 1.875 - 0.223144 + 2.475868 = 4.127724
    assert rdp_to_epsilon(1.875, 5.0, 1e-5) == pytest.approx(4.127724, abs=1e-5)
    eps, order = epsilon(2.0, 3, 1e-5)
    assert 0 < eps <= 4.127724 and order > 1
    # more releases or less noise spend more; none spends nothing; no noise is no privacy
    assert epsilon(2.0, 4, 1e-5)[0] > eps > epsilon(4.0, 3, 1e-5)[0]
    assert epsilon(2.0, 0, 1e-5)[0] == 0.0
    assert epsilon(0.0, 1, 1e-5)[0] == float("inf")


def _clipped(update: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    total = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in update.values()))
    return {k: v * (min(1.0, norm / total) if total > 0 else 1.0) for k, v in update.items()}


@pytest.mark.parametrize(("clipping", "noise"), [("server", 0.0), ("client", 1.5)])
def test_dp_clipping_bounds_every_contribution(
    tmp_path, server_identity, device_disks, clipping, noise
) -> None:
    """Server-side clipping without noise: the new adapter is exactly the global one plus the
    clipped updates summed over the devices sent work, one of which echoes what it received (a
    zero update, which must not break the clipping). Client-side with noise: every update
    arrives clipped, and the privacy spent is reported per round."""
    clip = 1e-3
    cfg = compose(
        [
            "experiment=tiny",
            f"privacy={clipping}_dp",
            f"privacy.clipping_norm={clip}",
            f"privacy.noise_multiplier={noise}",
            "strategy.server_train=false",
            "strategy.fraction_evaluate=0",
        ]
    )
    replies: dict[int, list[tuple[dict, dict]]] = {1: [], 2: []}

    def record(msg: Message, node: int, reply: Message) -> Message:
        if msg.metadata.message_type == "train" and not reply.has_error():
            if clipping == "server" and node == 1002:
                reply = _with_adapter(reply, _adapter(msg))  # trained nothing
            rnd = int(msg.content.config_records["plan"]["server-round"])
            replies[rnd].append((_adapter(msg), _adapter(reply)))
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(3, tamper=record)
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    sent_round2 = next(
        _adapter(m)
        for m in grid.sent
        if m.metadata.message_type == "train"
        and int(m.content.config_records["plan"]["server-round"]) == 2
    )
    start = replies[1][0][0]
    updates = [{k: got[k].astype(np.float64) - start[k] for k in start} for _, got in replies[1]]
    norms = [np.sqrt(sum(np.sum(v**2) for v in u.values())) for u in updates]
    privacy = [r["privacy"] for r in rows[1:]]
    assert all(p["clipping"] == clipping and p["devices"] == 3 for p in privacy)
    assert [p["releases"] for p in privacy] == [1, 2]
    if clipping == "client":  # the devices clipped before sending
        assert all(n <= clip * (1 + 1e-4) for n in norms)
        assert privacy[0]["noise_std"] == pytest.approx(noise * clip / 3)
        for p in privacy:
            assert p["epsilon"] == pytest.approx(epsilon(noise, p["releases"], 1e-5)[0])
        assert 0 < privacy[0]["epsilon"] < privacy[1]["epsilon"]
        assert np.isfinite(rows[-1]["plugin_ppl"])
        return
    assert all(n > 10 * clip for n in norms[:2]) and norms[2] == 0  # unclipped on the wire
    expected = {
        k: start[k] + np.sum([_clipped(u, clip)[k] for u in updates], axis=0) / 3 for k in start
    }
    for key in start:
        np.testing.assert_allclose(sent_round2[key], expected[key], atol=1e-7)
    moved = np.sqrt(sum(np.sum((sent_round2[k] - start[k]) ** 2) for k in start))
    assert moved <= clip * (1 + 1e-4)
    assert privacy[0]["noise_std"] == 0 and privacy[0]["epsilon"] is None  # no noise: no bound


# ------------------------------------------------------------------ crash and resume

RESUMABLE = (
    "experiment=tiny rounds=4 controller=ppo controller.ppo.checkpoint= "
    "controller.ppo.online_every=2 strategy.fraction_evaluate=0"
)


def test_a_killed_server_resumes_to_the_uninterrupted_result(
    tmp_path, server_identity, device_disks
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    from server_app.checkpoint import open_resume

    # Each run has its own device disks: what devices hold changes what is sent, hence the
    # modelled latency and the controller's reward.
    whole = tmp_path / "whole"
    whole.mkdir()
    os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = str(
        tmp_path / "devices-whole"
    )  # restored by the fixture
    _run(InProcessGrid(3), compose(RESUMABLE), whole)
    os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = str(tmp_path / "devices-killed")

    killed = tmp_path / "killed"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serve_inprocess", str(killed), RESUMABLE, "3"],
        cwd=root,
        env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            marker = killed / "checkpoint.json"
            if marker.is_file() and json.loads(marker.read_text())["round"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the server finished or died before round 2 was checkpointed"
        proc.send_signal(signal.SIGKILL)  # no clean-up, no summary: as a crash
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "summary.json").exists()
    done = json.loads((killed / "checkpoint.json").read_text())["round"]
    assert done in (2, 3)

    cfg = compose(f"{RESUMABLE} resume={killed}")
    run_dir, ckpt = open_resume(cfg, tmp_path)
    assert run_dir == killed and ckpt.round == done
    _run(InProcessGrid(3), cfg, run_dir, None, ckpt)

    rows = read_metrics(killed / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
    want, got = _final_state(whole), _final_state(killed)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
    # the same controller decisions (node ids are 1000 + partition in-process) and rewards
    ref = read_metrics(whole / "metrics.jsonl")
    assert [r["action"] for r in rows] == [r["action"] for r in ref]
    assert [r["reward"] for r in rows[1:]] == pytest.approx(
        [r["reward"] for r in ref[1:]], rel=1e-6
    )
    np.testing.assert_allclose(
        [r["plugin_ppl"] for r in rows], [r["plugin_ppl"] for r in ref], rtol=1e-5
    )


def test_resume_refuses_what_it_cannot_continue(tmp_path, server_identity, device_disks) -> None:
    from fedpeat.config import ConfigError
    from server_app.checkpoint import open_resume

    with pytest.raises(ConfigError, match="no run directory at"):
        open_resume(compose(f"experiment=tiny resume={tmp_path / 'absent'}"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoint.pt does not exist"):
        open_resume(compose(f"experiment=tiny resume={tmp_path / 'empty'}"), tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(
        InProcessGrid(2), compose("experiment=tiny rounds=1 strategy.fraction_evaluate=0"), run_dir
    )
    with pytest.raises(
        ConfigError, match=r"in \['seed', 'strategy.fraction_evaluate'\]; only \['rounds'"
    ):
        open_resume(compose(f"experiment=tiny rounds=2 seed=7 resume={run_dir}"), tmp_path)
    same = "experiment=tiny strategy.fraction_evaluate=0"
    with pytest.raises(ConfigError, match="already finished round 1 of rounds=1"):
        open_resume(compose(f"{same} rounds=1 resume={run_dir}"), tmp_path)
    assert open_resume(compose(f"{same} rounds=2 resume={run_dir}"), tmp_path)[1].round == 1
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        open_resume(compose(f"{same} rounds=2 resume={run_dir}"), tmp_path)
