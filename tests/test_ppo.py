"""PPO maths: GAE, the clipped losses, and the learner on a bandit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeat.config import PPOConfig
from strategies.control.edge_env import DEVICE_FEATURES, GLOBAL_FEATURES, OPTION_FEATURES, Obs
from strategies.control.ppo import (
    Batch,
    PPOLearner,
    SetPolicy,
    gae,
    log_prob_entropy,
    normalise,
    pad,
    ppo_loss,
)

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


def _obs(gains: np.ndarray, k: int, rng: np.random.Generator) -> Obs:
    """N devices (channel gain feature = `gains`), K levels, the other features random."""
    n = len(gains)
    device = rng.normal(size=(n, DEVICE_FEATURES)).astype(np.float32)
    device[:, 0] = gains
    option = rng.normal(size=(n, k + 1, OPTION_FEATURES)).astype(np.float32)
    option[:, :, 0] = 0.0
    option[:, 0, 0] = 1.0  # skip
    option[:, 1:, 1] = np.linspace(0.2, 1.0, k)[None, :]  # fidelity: option K is the best
    glob = rng.normal(size=GLOBAL_FEATURES).astype(np.float32)
    return Obs(device, option, glob, np.ones((n, k + 1), bool))


def test_learner_solves_a_bandit_for_fleets_it_never_saw() -> None:
    """Reward per device: 1 for the best level where its channel is good (gain > 0), 1 for
    skip where it is bad. Trained on 2-3 devices and 2-3 levels; greedy on 7 devices and 4
    levels it answers every device: the branches share one scorer."""
    cfg = PPOConfig(hidden=16, lr=0.01, epochs=4, minibatches=4, rollout_steps=128, ent_coef=0.0)
    learner = PPOLearner(cfg, seed=0)
    rng = np.random.default_rng(0)

    def answer(o: Obs) -> np.ndarray:
        k = o.option.shape[1] - 1
        return np.where(o.device[:, 0] > 0, k, 0)

    for _ in range(30):
        obs = [
            _obs(rng.normal(size=rng.integers(2, 4)), int(rng.integers(2, 4)), rng)
            for _ in range(cfg.rollout_steps)
        ]
        acts, logps, vals, rews = [], [], [], []
        for o in obs:
            a, lp, v = learner.act(o)
            acts.append(a)
            logps.append(lp)
            vals.append(v)
            rews.append(float((a == answer(o)).mean()))
        n = cfg.rollout_steps
        learner.update(
            Batch(obs, acts, np.array(logps), np.array(vals), np.array(rews), np.ones(n), 0.0)
        )
    for _ in range(5):
        o = _obs(np.array([1.0, -1.0, 0.8, -0.7, 1.5, -1.2, 0.6]), 4, rng)
        action, _, value = learner.act(o, greedy=True)
        np.testing.assert_array_equal(action, answer(o))
        assert value == pytest.approx(1.0, abs=0.3)


def test_policy_is_permutation_equivariant_and_padding_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    net = SetPolicy(8)
    small, large = _obs(rng.normal(size=2), 2, rng), _obs(rng.normal(size=5), 4, rng)
    alone, value_alone = net(pad([small]))
    both, values = net(pad([small, large]))
    # The small fleet padded beside a larger one: the same logits and value.
    torch.testing.assert_close(both[0, :2, :3], alone[0])
    assert (both[0, 2:, 1:] < -1e8).all() and (both[0, :2, 3:] < -1e8).all()
    torch.testing.assert_close(values[0], value_alone[0])
    # Reordering the devices reorders their logits and leaves the value alone.
    perm = np.array([3, 0, 4, 1, 2])
    shuffled = Obs(large.device[perm], large.option[perm], large.glob, large.valid[perm])
    logits, value = net(pad([shuffled]))
    torch.testing.assert_close(logits[0], both[1][torch.as_tensor(perm)])
    torch.testing.assert_close(value[0], values[1])


def test_options_a_device_cannot_hold_are_never_chosen() -> None:
    rng = np.random.default_rng(5)
    learner = PPOLearner(PPOConfig(hidden=8), seed=0)
    o = _obs(rng.normal(size=4), 3, rng)
    o.valid[:, 2:] = False  # only skip and the first level fit
    o.valid[3, 1] = False  # device 3 fits none: skip
    for _ in range(50):
        action, logp, _ = learner.act(o)
        assert action.max() <= 1 and action[3] == 0 and np.isfinite(logp)


def test_log_prob_and_entropy_by_hand() -> None:
    # Two devices, uniform over 2 options; the second is padding (ignored).
    logits = torch.zeros(1, 2, 2)
    logp, entropy = log_prob_entropy(logits, torch.tensor([[1, 0]]), torch.tensor([[True, False]]))
    assert float(logp[0]) == pytest.approx(math.log(0.5))
    assert float(entropy[0]) == pytest.approx(math.log(2))  # per real device
    logp, entropy = log_prob_entropy(logits, torch.tensor([[1, 0]]), torch.tensor([[True, True]]))
    assert float(logp[0]) == pytest.approx(2 * math.log(0.5))  # joint: a sum over devices
    assert float(entropy[0]) == pytest.approx(math.log(2))


def test_learner_state_round_trips_and_rejects_another_shape() -> None:
    cfg = PPOConfig(hidden=8)
    a = PPOLearner(cfg, seed=1)
    b = PPOLearner(cfg, seed=2)
    b.load_state_dict(a.state_dict())
    o = _obs(np.array([0.5, -0.5, 0.1]), 3, np.random.default_rng(0))
    assert a.act(o, greedy=True)[2] == b.act(o, greedy=True)[2]
    with pytest.raises(ValueError, match="this run needs"):
        PPOLearner(PPOConfig(hidden=16), seed=0).load_state_dict(a.state_dict())
