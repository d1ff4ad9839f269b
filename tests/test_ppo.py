"""PPO maths: GAE, the clipped losses, and the learner on a bandit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeat.config import PPOConfig
from strategies.control.ppo import Batch, PPOLearner, gae, normalise, ppo_loss

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
