"""The edge environment by hand: rates, latency, perplexity progress, penalties, observations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strategies.control.edge_env import (
    DEVICE_FEATURES,
    FLEET_SCALE,
    OPTION_FEATURES,
    ROUND_SCALE,
    Progress,
    progress,
    random_env,
)
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
    assert obs.device.shape == (2, DEVICE_FEATURES)
    assert obs.option.shape == (2, 3, OPTION_FEATURES)
    # data shares: Dirichlet draws, times N (1 = an equal share); no swaps, holds nothing
    assert obs.device[:, 1].sum() == pytest.approx(2.0)
    np.testing.assert_array_equal(obs.device[:, 2:], 0.0)
    # device 1 (400 MB): headroom (400-600)/600 and (400-300)/300, clipped to [-1, 1]
    np.testing.assert_allclose(obs.option[1, 1:, 2], [-1 / 3, 1 / 3], rtol=1e-6)
    # skip: is-skip 1, no fidelity, always fits; levels: fidelity 0.1 and 0.01, 600 and 300 MB
    np.testing.assert_allclose(obs.option[0, 0], [1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(obs.option[0, 1:, 1], [0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(obs.option[0, 1:, 3], [0.6, 0.3], rtol=1e-6)
    np.testing.assert_allclose(obs.option[0, 1:, 4], [1e8 / 2**20 / 1000, 5e7 / 2**20 / 1000])
    # device 0's round at level 0 by hand (emulator sent: it holds none), log10(1 + s) / 3
    h = np.random.default_rng(0).exponential(1.0, 2)
    rate = _rate(1e6, 20.0, 100.0, h[0])
    seconds = 8 * (1e8 + 1e6) / rate + 8 * 1e6 / rate + 1000 * 4 * 1e8 / 10e9
    assert obs.option[0, 1, 6] == pytest.approx(math.log10(1 + seconds) / 3, rel=1e-5)
    # round 0 of 3, ppl ratio 1, 2 devices: fixed scales, not the episode's length
    np.testing.assert_allclose(obs.glob, [0.0, 3 / ROUND_SCALE, 1.0, 2 / FLEET_SCALE])
    obs, _, _, _, _ = env.step(np.array([2, 0]))
    # device 0 now holds level 1 (option 2)
    assert obs.device[0, 3] == 1.0 and obs.device[1, 3] == 0.0
    np.testing.assert_array_equal(obs.option[0, :, 5], [0, 0, 1])
    # level 1, held: the adapter both ways and the compute, no emulator to download
    s = env.situation
    assert s is not None
    rate = _rate(1e6, 20.0, 100.0, np.random.default_rng(0).exponential(1.0, 4)[2])
    held = 8 * 1e6 / rate + 8 * 1e6 / rate + 1000 * 4 * 5e7 / 10e9
    assert s.option_s[0, 1] == pytest.approx(held, rel=1e-9)
    assert obs.glob[0] == pytest.approx(1 / ROUND_SCALE)


def test_random_systems_vary_and_repeat_with_their_seed() -> None:
    from fedpeat.config import compose

    cfg = compose("controller=ppo")
    draws = [random_env(cfg, np.random.default_rng(s)) for s in range(40)]
    sizes = {e.n for e in draws}
    assert min(sizes) >= 2 and max(sizes) <= 32 and len(sizes) > 5
    assert len({e.k for e in draws}) > 1 and all(e.k >= 1 for e in draws)
    assert len({e.rounds for e in draws}) > 3 and min(e.rounds for e in draws) >= 3
    keeps = {p.keep for p in cfg.controller.curve}
    assert all(lv.keep in keeps and 0 < lv.fidelity <= 1 for e in draws for lv in e.levels)
    again = random_env(cfg, np.random.default_rng(7))
    assert again.profiles == draws[7].profiles and again.levels == draws[7].levels
