"""PPO with action branching: one categorical head per device on a shared trunk.

The maths are small pure functions (GAE, the clipped losses, advantage normalisation) with shapes
in their docstrings; `PPOLearner` holds the network and optimiser and updates from a batch of
transitions it did not collect itself, so the same learner pre-trains on the environment and
learns online from federated rounds. Names follow CleanRL (`b_` batch, `mb_` minibatch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpeat.config import PPOConfig

# --------------------------------------------------------------------------- pure maths


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_value: float,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over one trajectory buffer.

    rewards, values, dones: (T,), where dones[t] = 1 when the episode ended *after* step t (so
    step t+1, if any, starts a new episode). last_value: V of the state after the last step
    (ignored when dones[-1]). Returns (advantages, returns = advantages + values), both (T,):
    delta_t = r_t + gamma V_{t+1} (1 - d_t) - V_t, A_t = delta_t + gamma lam (1 - d_t) A_{t+1}.
    """
    t_max = len(rewards)
    adv = np.zeros(t_max, dtype=np.float64)
    running = 0.0
    for t in reversed(range(t_max)):
        next_value = last_value if t == t_max - 1 else values[t + 1]
        live = 1.0 - float(dones[t])
        delta = rewards[t] + gamma * next_value * live - values[t]
        running = delta + gamma * lam * live * running
        adv[t] = running
    return adv, adv + values


def normalise(adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (population) std; a single element stays as is."""
    if adv.numel() < 2:
        return adv
    return (adv - adv.mean()) / (adv.std(unbiased=False) + eps)


@dataclass
class Losses:
    total: torch.Tensor
    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: torch.Tensor


def ppo_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    new_values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    clip: float,
    vf_coef: float,
    ent_coef: float,
) -> Losses:
    """Clipped surrogate + value + entropy, all (B,) inputs.

    policy = mean(max(-A r, -A clip(r, 1-c, 1+c))), r = exp(new - old);
    value = 0.5 mean((V - R)^2); total = policy + vf_coef value - ent_coef mean(entropy).
    approx_kl is CleanRL's ((r - 1) - log r) estimator.
    """
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    v = 0.5 * ((new_values - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():
        kl = ((ratio - 1) - log_ratio).mean()
        frac = ((ratio - 1).abs() > clip).float().mean()
    return Losses(pg + vf_coef * v - ent_coef * ent, pg, v, ent, kl, frac)


# --------------------------------------------------------------------------- network


def _layer(i: int, o: int, std: float = float(np.sqrt(2))) -> nn.Linear:
    layer = nn.Linear(i, o)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class BranchingPolicy(nn.Module):
    """Shared tanh trunk; one (K+1)-way head per device and a value head."""

    def __init__(self, obs_dim: int, n_heads: int, n_options: int, hidden: int) -> None:
        super().__init__()
        self.n_heads, self.n_options = n_heads, n_options
        self.trunk = nn.Sequential(
            _layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh()
        )
        self.logits = _layer(hidden, n_heads * n_options, std=0.01)
        self.value = _layer(hidden, 1, std=1.0)

    def dist(self, obs: torch.Tensor) -> tuple[torch.distributions.Categorical, torch.Tensor]:
        h = self.trunk(obs)
        logits = self.logits(h).view(-1, self.n_heads, self.n_options)
        return torch.distributions.Categorical(logits=logits), self.value(h).squeeze(-1)


# --------------------------------------------------------------------------- learner


@dataclass
class Batch:
    """Transitions for one update; T steps of one stream in order (for GAE)."""

    obs: np.ndarray  # (T, obs_dim)
    actions: np.ndarray  # (T, n_heads) ints
    logp: np.ndarray  # (T,)
    values: np.ndarray  # (T,)
    rewards: np.ndarray  # (T,)
    dones: np.ndarray  # (T,)
    last_value: float


class PPOLearner:
    """Acts and learns; `update` takes any batch of transitions collected with `act`."""

    def __init__(
        self, obs_dim: int, n_heads: int, n_options: int, cfg: PPOConfig, seed: int
    ) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # network init
        self.net = BranchingPolicy(obs_dim, n_heads, n_options, cfg.hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)
        self.shape = (obs_dim, n_heads, n_options)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = False) -> tuple[np.ndarray, float, float]:
        """(action per head, its log-probability, the state's value)."""
        dist, value = self.net.dist(torch.as_tensor(obs, dtype=torch.float32)[None])
        if greedy:
            action = dist.probs.argmax(-1)
        else:
            action = torch.multinomial(
                dist.probs.view(-1, self.shape[2]), 1, generator=self.gen
            ).view(1, -1)
        logp = dist.log_prob(action).sum(-1)
        return action[0].numpy(), float(logp[0]), float(value[0])

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> float:
        return float(self.net.dist(torch.as_tensor(obs, dtype=torch.float32)[None])[1][0])

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def update(self, batch: Batch) -> dict[str, float]:
        """GAE, then `epochs` passes over shuffled minibatches of the clipped loss."""
        c = self.cfg
        adv, ret = gae(
            batch.rewards, batch.values, batch.dones, batch.last_value, c.gamma, c.gae_lambda
        )
        b_obs = torch.as_tensor(batch.obs, dtype=torch.float32)
        b_act = torch.as_tensor(batch.actions, dtype=torch.long)
        b_logp = torch.as_tensor(batch.logp, dtype=torch.float32)
        b_adv = torch.as_tensor(adv, dtype=torch.float32)
        b_ret = torch.as_tensor(ret, dtype=torch.float32)
        size = len(b_obs)
        mb_size = max(1, size // c.minibatches)
        stats: dict[str, float] = {}
        for _ in range(c.epochs):
            order = torch.randperm(size, generator=self.gen)
            for start in range(0, size, mb_size):
                mb = order[start : start + mb_size]
                dist, values = self.net.dist(b_obs[mb])
                losses = ppo_loss(
                    dist.log_prob(b_act[mb]).sum(-1),
                    b_logp[mb],
                    normalise(b_adv[mb]),
                    values,
                    b_ret[mb],
                    dist.entropy().sum(-1),
                    c.clip,
                    c.vf_coef,
                    c.ent_coef,
                )
                self.opt.zero_grad()
                losses.total.backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), c.max_grad_norm)
                self.opt.step()
                stats = {
                    "policy_loss": losses.policy.item(),
                    "value_loss": losses.value.item(),
                    "entropy": losses.entropy.item(),
                    "approx_kl": losses.approx_kl.item(),
                    "clip_fraction": losses.clip_fraction.item(),
                }
        return stats

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, object]:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "shape": self.shape,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        if tuple(state["shape"]) != self.shape:  # type: ignore[arg-type]
            raise ValueError(
                f"checkpoint policy has (obs, devices, options) {tuple(state['shape'])}, "  # type: ignore[arg-type]
                f"this run needs {self.shape}"
            )
        self.net.load_state_dict(state["net"])  # type: ignore[arg-type]
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.gen.set_state(state["gen"])  # type: ignore[arg-type]
