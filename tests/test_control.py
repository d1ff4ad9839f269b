"""Controller maths: GAE, PPO losses, the learner on a bandit, the edge environment by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpeat.config import ControllerConfig, DeviceProfile, PPOConfig, compose
from strategies.controllers import Fixed, Greedy, RandomController, best_fitting, make_controller
from strategies.edge_env import EdgeEnv, Level, Progress, make_env, obs_size, progress
from strategies.ppo import Batch, PPOLearner, gae, normalise, ppo_loss

# --------------------------------------------------------------------------- GAE


def test_gae_by_hand() -> None:
    # gamma .9, lambda .8; the episode ends after step 1.
    # t=2: delta = 2 + .9*.4 - .1 = 2.26 = A2
    # t=1: done, delta = 0 - .2 = -.2 = A1 (no bootstrap, no carry)
    # t=0: delta = 1 + .9*.2 - .5 = .68, A0 = .68 + .9*.8*(-.2) = .536
    adv, ret = gae(
        np.array([1.0, 0.0, 2.0]),
        np.array([0.5, 0.2, 0.1]),
        np.array([0.0, 1.0, 0.0]),
        0.4,
        0.9,
        0.8,
    )
    np.testing.assert_allclose(adv, [0.536, -0.2, 2.26])
    np.testing.assert_allclose(ret, [1.036, 0.0, 2.36])


def _reference_gae(rewards, values, dones, last_value, gamma, lam):  # type: ignore[no-untyped-def]
    """Forward-looking definition: A_t = sum_l (gamma lam)^l delta_{t+l} within the episode."""
    t_max = len(rewards)
    nxt = np.append(values[1:], last_value)
    deltas = rewards + gamma * nxt * (1 - dones) - values
    adv = np.zeros(t_max)
    for t in range(t_max):
        acc, factor = 0.0, 1.0
        for u in range(t, t_max):
            acc += factor * deltas[u]
            if dones[u]:
                break
            factor *= gamma * lam
        adv[t] = acc
    return adv


def test_gae_matches_the_forward_sum_on_random_trajectories() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        r, v = rng.normal(size=40), rng.normal(size=40)
        d = (rng.random(40) < 0.15).astype(float)
        adv, _ = gae(r, v, d, 0.7, 0.95, 0.9)
        np.testing.assert_allclose(adv, _reference_gae(r, v, d, 0.7, 0.95, 0.9), atol=1e-10)


# --------------------------------------------------------------------------- PPO loss


def test_ppo_loss_by_hand() -> None:
    # ratios 1 and 1.5 (clipped to 1.2); advantages 1 and -1:
    # item 0: max(-1*1, -1*1) = -1; item 1: max(1.5, 1.2) = 1.5 -> policy .25
    # value .5 * mean(1, 0) = .25; entropy mean 1; total .25 + .5*.25 - .01*1 = .365
    # approx kl: mean((r-1) - log r) = (0 + .5 - ln 1.5) / 2; clip fraction 1/2
    losses = ppo_loss(
        torch.tensor([0.0, math.log(1.5)]),
        torch.zeros(2),
        torch.tensor([1.0, -1.0]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.0, 2.0]),
        torch.tensor([0.5, 1.5]),
        clip=0.2,
        vf_coef=0.5,
        ent_coef=0.01,
    )
    assert float(losses.policy) == pytest.approx(0.25)
    assert float(losses.value) == pytest.approx(0.25)
    assert float(losses.entropy) == pytest.approx(1.0)
    assert float(losses.total) == pytest.approx(0.365)
    assert float(losses.approx_kl) == pytest.approx((0.5 - math.log(1.5)) / 2)
    assert float(losses.clip_fraction) == pytest.approx(0.5)


def test_positive_advantage_clips_above_one_plus_epsilon() -> None:
    # A = 2, r = 2: min(2*2, 2*1.2) = 2.4 -> loss -2.4 (no incentive past the clip)
    losses = ppo_loss(
        torch.tensor([math.log(2.0)]),
        torch.zeros(1),
        torch.tensor([2.0]),
        torch.zeros(1),
        torch.zeros(1),
        torch.zeros(1),
        0.2,
        0.5,
        0.0,
    )
    assert float(losses.policy) == pytest.approx(-2.4)


def test_normalise() -> None:
    out = normalise(torch.tensor([1.0, 3.0]))
    np.testing.assert_allclose(out.numpy(), [-1.0, 1.0], atol=1e-6)
    assert float(normalise(torch.tensor([5.0]))[0]) == 5.0


# --------------------------------------------------------------------------- learner


def test_learner_solves_a_contextual_bandit() -> None:
    # Two contexts (one-hot); two heads of three options; reward 1 per head that picks the
    # context's answer: context 0 -> (2, 0), context 1 -> (1, 1). Episodes of one step.
    cfg = PPOConfig(hidden=16, lr=0.02, epochs=4, minibatches=4, rollout_steps=128, ent_coef=0.0)
    learner = PPOLearner(2, 2, 3, cfg, seed=0)
    answers = np.array([[2, 0], [1, 1]])
    rng = np.random.default_rng(0)
    for _ in range(40):
        ctx = rng.integers(0, 2, cfg.rollout_steps)
        obs = np.eye(2, dtype=np.float32)[ctx]
        acts, logps, vals, rews = [], [], [], []
        for o, c in zip(obs, ctx, strict=True):
            a, lp, v = learner.act(o)
            acts.append(a)
            logps.append(lp)
            vals.append(v)
            rews.append(float((a == answers[c]).sum()))
        learner.update(
            Batch(
                obs,
                np.stack(acts),
                np.array(logps),
                np.array(vals),
                np.array(rews),
                np.ones(cfg.rollout_steps),
                0.0,
            )
        )
    for c in (0, 1):
        action, _, value = learner.act(np.eye(2, dtype=np.float32)[c], greedy=True)
        np.testing.assert_array_equal(action, answers[c])
        assert value == pytest.approx(2.0, abs=0.3)


def test_learner_state_round_trips_and_rejects_another_shape() -> None:
    cfg = PPOConfig(hidden=8)
    a = PPOLearner(4, 2, 3, cfg, seed=1)
    b = PPOLearner(4, 2, 3, cfg, seed=2)
    b.load_state_dict(a.state_dict())
    obs = np.ones(4, dtype=np.float32)
    assert a.act(obs, greedy=True)[2] == b.act(obs, greedy=True)[2]
    with pytest.raises(ValueError, match="this run needs"):
        PPOLearner(5, 2, 3, cfg, seed=0).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- environment


def _hand_env() -> EdgeEnv:
    # Device 0: 1000 MB, 10 GFLOP/s, 1 MHz, 20 dBm, 100 m. Device 1: 400 MB (fits level 1 only).
    profiles = [
        DeviceProfile("a", 1000, 10.0, 1.0, 20.0, 100.0),
        DeviceProfile("b", 400, 5.0, 0.5, 10.0, 200.0),
    ]
    levels = [Level(0.5, 0.1, 1e8, 10**8, 600.0), Level(0.25, 0.01, 5e7, 5 * 10**7, 300.0)]
    cfg = ControllerConfig(
        name="ppo",
        w_ppl=1.0,
        w_latency=0.01,
        w_swaps=0.5,
        memory_penalty=2.0,
        swap_penalty=1.0,
        swap_share=0.25,
        episode_rounds=3,
        floor_share=0.5,
        eta=1.0,
        beta=1.0,
        tokens=1000,
        adapter_bytes=1e6,
        ppl_full=100.0,
    )
    return EdgeEnv(profiles, levels, cfg, data_shares=[0.25, 0.75])


def _rate(bw_hz: float, p_dbm: float, d_m: float, fading: float) -> float:
    pl_db = 128.1 + 37.6 * math.log10(d_m / 1000)
    signal_w = 10 ** ((p_dbm - 30) / 10) * 10 ** (-pl_db / 10) * fading
    noise_w = 10 ** ((-174 - 30) / 10) * bw_hz
    return bw_hz * math.log2(1 + signal_w / noise_w)


def test_environment_rates_latency_and_penalties_by_hand() -> None:
    env = _hand_env()
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
    env = _hand_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_size(2, 2),) == env.observation_space.shape
    per = 1 + 2 + 3 + 1 + 1
    # device 1 (400 MB): headroom (400-600)/600 and (400-300)/300, clipped to [-1, 1]
    np.testing.assert_allclose(obs[per + 1 : per + 3], [-1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(obs[per + 3 : per + 6], [1, 0, 0])  # holds nothing
    assert obs[-2:].tolist() == [0.0, 1.0]


def test_baselines_act_as_documented() -> None:
    env = _hand_env()
    env.reset(seed=0)
    s = env.situation
    assert s is not None
    assert Fixed(0).act(s) == [1, 1]
    assert best_fitting(s, 0) == 1 and best_fitting(s, 1) == 2
    s.gain_db = np.array([-120.0, -90.0])  # device 1 has the better channel
    assert Greedy(0.5).act(s) == [0, 2]
    assert Greedy(1.0).act(s) == [1, 2]
    acts = [RandomController(2, 0).act(s) for _ in range(3)]
    assert all(0 <= a <= 2 for act in acts for a in act)


def test_default_environment_and_controllers_compose() -> None:
    cfg = compose("controller=ppo")
    env = make_env(cfg)
    assert env.n == 6 and env.k == 4
    assert [lv.keep for lv in env.levels] == cfg.emulator.levels
    for name in ("fixed", "random", "greedy", "ppo"):
        c = make_controller(replace(cfg.controller, name=name), cfg.emulator.levels, 6, 0)
        assert c.name == name
    with pytest.raises(FileNotFoundError, match="controller.ppo.checkpoint"):
        make_controller(cfg.controller, cfg.emulator.levels, 6, 0, checkpoint=_missing())


def _missing():  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path("does/not/exist/ppo.pt")
