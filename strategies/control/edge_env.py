"""The edge system as a reinforcement-learning environment (FedPEAT's orchestration problem).

Each step is one federated round. The agent chooses, per device, skip (0) or take part with
emulator level k (1..K, in the order of `levels`). The environment draws Rayleigh fading per
device and round, prices the round with the cost model (`fedpeat.cost`: Shannon rate, emulator
and adapter transmission, compute), moves a perplexity-progress model, and returns

    reward = -(w_ppl * ppl / ppl_0 + w_latency * latency_s + w_swaps * swaps)
             - memory_penalty * memory_violations - swap_penalty * swap_violations.

Rounds are priced by `fedpeat.cost.price_round`, which the federated strategy uses too, so the
environment and the real rounds are priced the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from fedpeat.config import Config, ControllerConfig, DeviceProfile
from fedpeat.cost import Level, Weights, gains_db, price_round, reward


@dataclass(frozen=True)
class Progress:
    """Perplexity-progress model: the gap to `floor` shrinks by exp(-eta * quality ** beta)."""

    floor_share: float
    eta: float
    beta: float


def levels_of(cfg: ControllerConfig, keeps: Sequence[float]) -> list[Level]:
    """The curve points for `keeps`, in that order, with fidelity ppl_full / ppl."""
    by_keep = {p.keep: p for p in cfg.curve}
    return [
        Level(
            k,
            min(1.0, cfg.ppl_full / by_keep[k].ppl),
            by_keep[k].bytes,
            by_keep[k].params,
            by_keep[k].need_mb,
        )
        for k in keeps
    ]


# --------------------------------------------------------------------------- pure model


def progress(
    ppl: float, ppl0: float, shares: np.ndarray, fidelities: np.ndarray, model: Progress
) -> float:
    """Next round's perplexity when devices with data `shares` train at `fidelities`
    (zero for devices that do not take part)."""
    floor = model.floor_share * ppl0
    quality = float(np.dot(shares, fidelities))
    return floor + (ppl - floor) * math.exp(-model.eta * quality**model.beta)


# --------------------------------------------------------------------------- observation


@dataclass
class Situation:
    """What the controller sees at the start of a round (the strategy fills the same fields)."""

    gain_db: np.ndarray
    """(N,) channel gain this round."""
    memory_mb: np.ndarray
    """(N,) device budgets."""
    need_mb: np.ndarray
    """(K,) training memory per level."""
    fidelity: np.ndarray
    """(K,) per level."""
    holding: list[int]
    """(N,) 0 none, else level index + 1."""
    swap_counts: list[int]
    data_share: np.ndarray
    """(N,) sums to 1."""
    round_index: int
    rounds: int
    ppl_ratio: float
    """Last plug-in perplexity / round-0 perplexity."""

    def headroom(self) -> np.ndarray:
        """(N, K) (budget - need) / need, clipped to [-1, 1]: > 0 where the level fits."""
        h = (self.memory_mb[:, None] - self.need_mb[None, :]) / self.need_mb[None, :]
        return np.clip(h, -1.0, 1.0)

    def vector(self) -> np.ndarray:
        """Flat float32 observation: per device [gain, headroom per level, one-hot holding,
        swaps / rounds, data share], then [round / rounds, ppl ratio]."""
        n, k = len(self.memory_mb), len(self.need_mb)
        hold = np.zeros((n, k + 1))
        hold[np.arange(n), self.holding] = 1.0
        per_device = np.concatenate(
            [
                ((self.gain_db + 100.0) / 20.0)[:, None],  # ~[-1, 1] over 60..140 dB loss
                self.headroom(),
                hold,
                (np.asarray(self.swap_counts, dtype=np.float64) / max(self.rounds, 1))[:, None],
                self.data_share[:, None],
            ],
            axis=1,
        )
        glob = np.array([self.round_index / max(self.rounds, 1), self.ppl_ratio])
        return np.concatenate([per_device.ravel(), glob]).astype(np.float32)


def obs_size(n_devices: int, n_levels: int) -> int:
    return n_devices * (1 + n_levels + n_levels + 1 + 1 + 1) + 2


# --------------------------------------------------------------------------- environment


class EdgeEnv(gym.Env[np.ndarray, np.ndarray]):
    """N devices, K emulator levels, `rounds` rounds per episode (module docstring)."""

    def __init__(
        self,
        profiles: Sequence[DeviceProfile],
        levels: Sequence[Level],
        cfg: ControllerConfig,
        data_shares: Sequence[float] | None = None,
    ) -> None:
        self.metadata = {"render_modes": []}
        self.profiles, self.levels, self.cfg = list(profiles), list(levels), cfg
        self.n, self.k = len(self.profiles), len(self.levels)
        self.weights = Weights(
            cfg.w_ppl,
            cfg.w_latency,
            cfg.w_swaps,
            cfg.memory_penalty,
            cfg.swap_penalty,
            cfg.swap_share,
        )
        self.model = Progress(cfg.floor_share, cfg.eta, cfg.beta)
        self.fixed_shares = None if data_shares is None else np.asarray(data_shares, float)
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, (obs_size(self.n, self.k),), np.float32
        )
        self.action_space = gym.spaces.MultiDiscrete([self.k + 1] * self.n)
        self.ppl0 = cfg.ppl_full
        self._rng = np.random.default_rng()
        self.situation: Situation | None = None
        self.fading = np.ones(self.n)
        self.ppl = self.ppl0

    def _draw_fading(self) -> None:
        self.fading = self._rng.exponential(1.0, self.n)
        assert self.situation is not None
        self.situation.gain_db = gains_db(self.profiles, self.fading)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if self.fixed_shares is not None:
            shares = self.fixed_shares / self.fixed_shares.sum()
        elif self.cfg.data_alpha > 0:
            shares = self._rng.dirichlet([self.cfg.data_alpha] * self.n)
        else:
            shares = np.full(self.n, 1.0 / self.n)
        self.ppl = self.ppl0
        self.situation = Situation(
            gain_db=np.zeros(self.n),
            memory_mb=np.array([p.memory_mb for p in self.profiles], dtype=np.float64),
            need_mb=np.array([lv.need_mb for lv in self.levels]),
            fidelity=np.array([lv.fidelity for lv in self.levels]),
            holding=[0] * self.n,
            swap_counts=[0] * self.n,
            data_share=shares,
            round_index=0,
            rounds=self.cfg.episode_rounds,
            ppl_ratio=1.0,
        )
        self._draw_fading()
        return self.situation.vector(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        s = self.situation
        if s is None:
            raise RuntimeError("call reset() before step()")
        act = [int(a) for a in np.asarray(action).ravel()]
        if len(act) != self.n or any(a < 0 or a > self.k for a in act):
            raise ValueError(f"action needs {self.n} entries in [0, {self.k}], got {act}")
        out = price_round(
            act,
            self.profiles,
            self.levels,
            self.fading,
            s.holding,
            s.swap_counts,
            s.round_index,
            self.weights,
            self.cfg.adapter_bytes,
            self.cfg.tokens,
        )
        fid = np.zeros(self.n)
        for i in out.trained:
            fid[i] = self.levels[act[i] - 1].fidelity
        self.ppl = progress(self.ppl, self.ppl0, s.data_share, fid, self.model)
        r = reward(
            self.ppl,
            self.ppl0,
            out.latency_s,
            out.swaps,
            out.memory_violations,
            out.swap_violations,
            self.weights,
        )
        s.round_index += 1
        s.ppl_ratio = self.ppl / self.ppl0
        self._draw_fading()
        done = s.round_index >= s.rounds
        info = {
            "ppl": self.ppl,
            "latency_s": out.latency_s,
            "swaps": out.swaps,
            "memory_violations": out.memory_violations,
            "swap_violations": out.swap_violations,
            "trained": len(out.trained),
        }
        return s.vector(), r, done, False, info


def make_env(
    cfg: Config, data_shares: Sequence[float] | None = None, n_devices: int | None = None
) -> EdgeEnv:
    """The environment of `cfg`: devices i = profiles[i % len(profiles)] (as in simulation),
    levels `emulator.levels`, reward and curve from `controller`."""
    profiles = cfg.devices.profiles
    n = n_devices if n_devices is not None else len(profiles)
    devices = [profiles[i % len(profiles)] for i in range(n)]
    return EdgeEnv(
        devices, levels_of(cfg.controller, cfg.emulator.levels), cfg.controller, data_shares
    )
