"""The edge environment by hand: rates, latency, perplexity progress, penalties, observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.control.edge_env import Progress, obs_size, progress
from tests.helpers import hand_env


def _rate(bw_hz: float, p_dbm: float, d_m: float, fading: float) -> float:
    pl_db = 128.1 + 37.6 * math.log10(d_m / 1000)
    signal_w = 10 ** ((p_dbm - 30) / 10) * 10 ** (-pl_db / 10) * fading
    noise_w = 10 ** ((-174 - 30) / 10) * bw_hz
    return bw_hz * math.log2(1 + signal_w / noise_w)


def test_environment_rates_latency_and_penalties_by_hand() -> None:
    env = hand_env()
    env.reset(seed=7)
    h = np.random.default_rng(7).exponential(1.0, 2)  # the env's first fading draw
    # Round 1: device 0 at level 0 (fits), device 1 at level 0 (600 MB > 400 MB: violation).
    _, r1, done, _, info = env.step(np.array([1, 1]))
    rate0 = _rate(1e6, 20.0, 100.0, h[0])
    lat0 = 8 * (1e8 + 1e6) / rate0 + 8 * 1e6 / rate0 + 1000 * 4 * 1e8 / 10e9
    assert info["latency_s"] == pytest.approx(lat0, rel=1e-9)
    # perplexity: floor 50, gap 50 * exp(-(0.25 * 0.1)) (device 1 did not train)
    ppl1 = 50 + 50 * math.exp(-0.025)
    assert info["ppl"] == pytest.approx(ppl1)
    assert info["memory_violations"] == 1 and info["swaps"] == 0
    assert r1 == pytest.approx(-(ppl1 / 100 + 0.01 * lat0) - 2.0)
    assert not done
    # Round 2: device 0 swaps to level 1 (a swap; 1 > 0.25 * 2 -> a swap violation), device 1
    # takes level 1 (first download: an exchange, no swap).
    h2 = np.random.default_rng(7).exponential(1.0, 4)[2:]
    _, r2, _, _, info = env.step(np.array([2, 2]))
    lat_a = (
        8 * (5e7 + 1e6) / _rate(1e6, 20.0, 100.0, h2[0])
        + 8e6 / _rate(1e6, 20.0, 100.0, h2[0])
        + 1000 * 4 * 5e7 / 10e9
    )
    lat_b = (
        8 * (5e7 + 1e6) / _rate(0.5e6, 10.0, 200.0, h2[1])
        + 8e6 / _rate(0.5e6, 10.0, 200.0, h2[1])
        + 1000 * 4 * 5e7 / 5e9
    )
    assert info["latency_s"] == pytest.approx(max(lat_a, lat_b), rel=1e-9)
    ppl2 = 50 + (ppl1 - 50) * math.exp(-(0.25 * 0.01 + 0.75 * 0.01))
    assert info["ppl"] == pytest.approx(ppl2)
    assert info["swaps"] == 1 and info["swap_violations"] == 1
    assert r2 == pytest.approx(-(ppl2 / 100 + 0.01 * max(lat_a, lat_b) + 0.5) - 1.0)
    # Round 3: same levels: nothing sent but the adapters; the episode ends.
    _, _, done, _, info = env.step(np.array([2, 2]))
    assert info["swaps"] == 0 and done


def test_progress_has_diminishing_returns_in_data() -> None:
    model = Progress(0.5, 1.0, 0.5)
    one = 100 - progress(100, 100, np.array([0.25]), np.array([1.0]), model)
    four = 100 - progress(100, 100, np.array([1.0]), np.array([1.0]), model)
    assert four < 4 * one


def test_observation_layout() -> None:
    env = hand_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_size(2, 2),) == env.observation_space.shape
    per = 1 + 2 + 3 + 1 + 1
    # device 1 (400 MB): headroom (400-600)/600 and (400-300)/300, clipped to [-1, 1]
    np.testing.assert_allclose(obs[per + 1 : per + 3], [-1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(obs[per + 3 : per + 6], [1, 0, 0])  # holds nothing
    assert obs[-2:].tolist() == [0.0, 1.0]
