"""Differential privacy: the RDP accountant by hand, and clipping in whole in-process runs."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message

from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from fedpeat.outputs import read_metrics
from server_app.app import _run
from strategies.privacy import epsilon, gaussian_rdp, rdp_to_epsilon
from tests.helpers import adapter_of, with_adapter


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
                reply = with_adapter(reply, adapter_of(msg))  # trained nothing
            rnd = int(msg.content.config_records["plan"]["server-round"])
            replies[rnd].append((adapter_of(msg), adapter_of(reply)))
        return reply

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    grid = InProcessGrid(3, tamper=record)
    _run(grid, cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    sent_round2 = next(
        adapter_of(m)
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
