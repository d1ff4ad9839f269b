"""PPO with action branching whose branches share their weights: one network scores every
(device, option) pair, so the same policy runs any number of devices and any level list.

The maths are small pure functions (GAE, the clipped losses, advantage normalisation) with shapes
in their docstrings; `PPOLearner` holds the network and optimiser and updates from a batch of
transitions it did not collect itself, so the same learner pre-trains on the environment and
learns online from federated rounds. Names follow CleanRL (`b_` batch, `mb_` minibatch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpeat.config import PPOConfig
from strategies.control.edge_env import DEVICE_FEATURES, GLOBAL_FEATURES, OPTION_FEATURES, Obs

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


@dataclass
class Padded:
    """Observations of fleets of different sizes as tensors: B observations, padded to the
    largest N devices and K + 1 options; masks say which entries are real."""

    device: torch.Tensor  # (B, N, DEVICE_FEATURES)
    option: torch.Tensor  # (B, N, K + 1, OPTION_FEATURES)
    glob: torch.Tensor  # (B, GLOBAL_FEATURES)
    devices: torch.Tensor  # (B, N) bool
    options: torch.Tensor  # (B, N, K + 1) bool


def pad(obs: Sequence[Obs]) -> Padded:
    """Stack `obs`, zero-padding devices and options beyond each one's own; an option is
    masked where it is padding or not valid for its device."""
    b = len(obs)
    n = max(o.device.shape[0] for o in obs)
    k1 = max(o.option.shape[1] for o in obs)
    device = torch.zeros(b, n, DEVICE_FEATURES)
    option = torch.zeros(b, n, k1, OPTION_FEATURES)
    devices = torch.zeros(b, n, dtype=torch.bool)
    options = torch.zeros(b, n, k1, dtype=torch.bool)
    for i, o in enumerate(obs):
        ni, ki = o.option.shape[:2]
        device[i, :ni] = torch.from_numpy(o.device)
        option[i, :ni, :ki] = torch.from_numpy(o.option)
        devices[i, :ni] = True
        options[i, :ni, :ki] = torch.from_numpy(o.valid)
    options[:, :, 0] |= ~devices  # a padded device gets a valid, ignored option: skip
    glob = torch.from_numpy(np.stack([o.glob for o in obs]))
    return Padded(device, option, glob, devices, options)


class SetPolicy(nn.Module):
    """FedPEAT's action branching with the branches sharing parameters.

    Each device is encoded from its features and the round's globals; the fleet is summarised by
    the mean and the max of those encodings; one scorer gives each (device, option) pair a
    logit from the device's encoding, the option's features and the fleet's mean; the value
    reads the fleet summary and the globals. Nothing depends on N or K.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        h = hidden
        self.encode = nn.Sequential(
            _layer(DEVICE_FEATURES + GLOBAL_FEATURES, h), nn.Tanh(), _layer(h, h), nn.Tanh()
        )
        self.score = nn.Sequential(
            _layer(2 * h + OPTION_FEATURES, h), nn.Tanh(), _layer(h, 1, std=0.01)
        )
        self.value = nn.Sequential(
            _layer(2 * h + GLOBAL_FEATURES, h), nn.Tanh(), _layer(h, 1, std=1.0)
        )

    def forward(self, x: Padded) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, N, K + 1), masked options at -1e9; value (B,))."""
        b, n, k1, _ = x.option.shape
        glob = x.glob[:, None, :].expand(b, n, -1)
        h = self.encode(torch.cat([x.device, glob], -1))  # (B, N, H)
        m = x.devices[..., None].to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        top = h.masked_fill(~x.devices[..., None], -2.0).amax(1)  # tanh > -1: padding never wins
        pair = torch.cat(
            [h[:, :, None].expand(-1, -1, k1, -1), mean[:, None, None].expand(-1, n, k1, -1)], -1
        )
        logits = self.score(torch.cat([pair, x.option], -1)).squeeze(-1)
        logits = logits.masked_fill(~x.options, -1e9)
        value = self.value(torch.cat([mean, top, x.glob], -1)).squeeze(-1)
        return logits, value


def log_prob_entropy(
    logits: torch.Tensor, actions: torch.Tensor, devices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per observation: the joint log-probability of the devices' actions (sum over real
    devices) and the mean entropy per real device (so `ent_coef` means the same for any
    fleet). logits (B, N, K + 1), actions (B, N), devices (B, N) bool."""
    dist = torch.distributions.Categorical(logits=logits)
    m = devices.to(logits.dtype)
    logp = (dist.log_prob(actions) * m).sum(-1)
    entropy = (dist.entropy() * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return logp, entropy


# --------------------------------------------------------------------------- learner


@dataclass
class Batch:
    """Transitions for one update; T steps of one stream in order (for GAE). Each step may
    come from another fleet (pre-training draws a new system every episode)."""

    obs: list[Obs]  # T
    actions: list[np.ndarray]  # T of (N_t,) ints
    logp: np.ndarray  # (T,)
    values: np.ndarray  # (T,)
    rewards: np.ndarray  # (T,)
    dones: np.ndarray  # (T,)
    last_value: float


SHAPE = (DEVICE_FEATURES, OPTION_FEATURES, GLOBAL_FEATURES)
"""What a checkpoint must have been trained on (the feature layout), with its width."""


class PPOLearner:
    """Acts and learns; `update` takes any batch of transitions collected with `act`."""

    def __init__(self, cfg: PPOConfig, seed: int) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # network init
        self.net = SetPolicy(cfg.hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)
        self.shape = (*SHAPE, cfg.hidden)

    @torch.no_grad()
    def act(self, obs: Obs, greedy: bool = False) -> tuple[np.ndarray, float, float]:
        """(option per device, their joint log-probability, the state's value)."""
        x = pad([obs])
        logits, value = self.net(x)
        if greedy:
            action = logits.argmax(-1)
        else:
            probs = torch.softmax(logits[0], -1)
            action = torch.multinomial(probs, 1, generator=self.gen).view(1, -1)
        logp, _ = log_prob_entropy(logits, action, x.devices)
        return action[0].numpy(), float(logp[0]), float(value[0])

    @torch.no_grad()
    def value(self, obs: Obs) -> float:
        return float(self.net(pad([obs]))[1][0])

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def update(self, batch: Batch, minibatches: int = 0) -> dict[str, float]:
        """GAE, then `epochs` passes over shuffled minibatches of the clipped loss
        (`minibatches`: how many per pass; 0: `ppo.minibatches`)."""
        c = self.cfg
        adv, ret = gae(
            batch.rewards, batch.values, batch.dones, batch.last_value, c.gamma, c.gae_lambda
        )
        b_logp = torch.as_tensor(batch.logp, dtype=torch.float32)
        b_adv = torch.as_tensor(adv, dtype=torch.float32)
        b_ret = torch.as_tensor(ret, dtype=torch.float32)
        size = len(batch.obs)
        mb_size = max(1, size // (minibatches or c.minibatches))
        stats: dict[str, float] = {}
        for _ in range(c.epochs):
            order = torch.randperm(size, generator=self.gen)
            for start in range(0, size, mb_size):
                mb = order[start : start + mb_size]
                x = pad([batch.obs[i] for i in mb.tolist()])
                acts = torch.zeros(x.devices.shape, dtype=torch.long)
                for row, i in enumerate(mb.tolist()):
                    a = batch.actions[i]
                    acts[row, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.int64))
                logits, values = self.net(x)
                new_logp, entropy = log_prob_entropy(logits, acts, x.devices)
                losses = ppo_loss(
                    new_logp,
                    b_logp[mb],
                    normalise(b_adv[mb]),
                    values,
                    b_ret[mb],
                    entropy,
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
        raw = state.get("shape", ())
        shape = tuple(raw) if isinstance(raw, (tuple, list)) else ()
        if shape != self.shape:
            raise ValueError(
                f"checkpoint policy has (device, option, global features, width) {shape}, "
                f"this run needs {self.shape}: pre-train it again with this version"
            )
        self.net.load_state_dict(state["net"])  # type: ignore[arg-type]
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.gen.set_state(state["gen"])  # type: ignore[arg-type]
