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
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np

from fedpeat.config import Config, ControllerConfig, DeviceProfile
from fedpeat.cost import Level, MiB, Weights, device_latency_s, gains_db, price_round, reward


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


# Fixed scales, the same in pre-training and online, so that no feature depends on the length of
# the run or the size of the fleet it was trained on.
ROUND_SCALE = 20.0
"""Rounds: the round index and the rounds left are divided by this."""
MB_SCALE = 1000.0
"""Megabytes: training memory and wire size of an emulator."""
FLEET_SCALE = 64.0
"""Devices: the fleet's size (the largest fleet the policy is meant for)."""
DEVICE_FEATURES = 4
OPTION_FEATURES = 7
GLOBAL_FEATURES = 4


@dataclass
class Obs:
    """What the policy reads, for any number of devices N and levels K: one row per device,
    one row per (device, option) pair (option 0: skip; k: level k-1), and the round's globals."""

    device: np.ndarray
    """(N, DEVICE_FEATURES): channel gain, data share x N, swaps / ROUND_SCALE, holds any."""
    option: np.ndarray
    """(N, K + 1, OPTION_FEATURES): is skip, fidelity, memory headroom, training memory and
    wire size / MB_SCALE, whether the device holds that emulator already, and the device's
    modelled seconds for the round at that option, log10(1 + s) / 3."""
    glob: np.ndarray
    """(GLOBAL_FEATURES,): round and rounds left / ROUND_SCALE, ppl ratio, N / FLEET_SCALE."""
    valid: np.ndarray
    """(N, K + 1) bool: the options the policy may choose: skip, and the levels that fit the
    device's memory (invalid-action masking; a level that does not fit is never sent)."""


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
    holding: list[list[int]]
    """(N,) the options (level index + 1) each device holds, oldest use first."""
    swap_counts: list[int]
    data_share: np.ndarray
    """(N,) sums to 1."""
    round_index: int
    rounds: int
    ppl_ratio: float
    """Last plug-in perplexity / round-0 perplexity."""
    wire_mb: np.ndarray
    """(K,) megabytes an emulator of each level takes on the wire."""
    option_s: np.ndarray
    """(N, K) each device's modelled seconds this round at each level (`option_seconds`)."""

    def headroom(self) -> np.ndarray:
        """(N, K) (budget - need) / need, clipped to [-1, 1]: > 0 where the level fits."""
        h = (self.memory_mb[:, None] - self.need_mb[None, :]) / self.need_mb[None, :]
        return np.clip(h, -1.0, 1.0)

    def features(self) -> Obs:
        """The observation (`Obs`), every feature on a fixed scale."""
        n, k = len(self.memory_mb), len(self.need_mb)
        held = np.zeros((n, k + 1))
        for i, options in enumerate(self.holding):
            held[i, options] = 1.0
        device = np.stack(
            [
                (self.gain_db + 100.0) / 20.0,  # ~[-1, 1] over 60..140 dB loss
                self.data_share * n,  # 1: an equal share, whatever the fleet's size
                np.asarray(self.swap_counts, dtype=np.float64) / ROUND_SCALE,
                held.max(axis=1),
            ],
            axis=1,
        )
        option = np.zeros((n, k + 1, OPTION_FEATURES))
        option[:, 0, 0] = 1.0  # skip: no fidelity, always fits, costs nothing
        option[:, 0, 2] = 1.0
        option[:, 1:, 1] = self.fidelity[None, :]
        option[:, 1:, 2] = self.headroom()
        option[:, 1:, 3] = self.need_mb[None, :] / MB_SCALE
        option[:, 1:, 4] = self.wire_mb[None, :] / MB_SCALE
        option[:, :, 5] = held
        option[:, 1:, 6] = np.log10(1.0 + self.option_s) / 3.0  # 1 at about 17 minutes
        left = max(self.rounds - self.round_index, 0)
        glob = np.array(
            [self.round_index / ROUND_SCALE, left / ROUND_SCALE, self.ppl_ratio, n / FLEET_SCALE]
        )
        valid = np.concatenate([np.ones((n, 1), bool), self.headroom() >= 0.0], axis=1)
        return Obs(
            device.astype(np.float32), option.astype(np.float32), glob.astype(np.float32), valid
        )


def option_seconds(
    profiles: Sequence[DeviceProfile],
    levels: Sequence[Level],
    fading: np.ndarray,
    holding: Sequence[Sequence[int]],
    adapter_bytes: float,
    tokens: float,
) -> np.ndarray:
    """(N, K) what each device's round would take at each level with this round's fading
    (`fedpeat.cost.device_latency_s`; the emulator is sent where the device does not hold it):
    the device's system speed, as the policy sees it."""
    return np.array(
        [
            [
                device_latency_s(p, float(f), lv, k + 1 not in h, adapter_bytes, tokens)
                for k, lv in enumerate(levels)
            ]
            for p, f, h in zip(profiles, fading, holding, strict=True)
        ]
    ).reshape(len(profiles), len(levels))


# --------------------------------------------------------------------------- environment


class EdgeEnv(gym.Env[Obs, np.ndarray]):
    """N devices, K emulator levels, `rounds` rounds per episode (module docstring)."""

    def __init__(
        self,
        profiles: Sequence[DeviceProfile],
        levels: Sequence[Level],
        cfg: ControllerConfig,
        data_shares: Sequence[float] | None = None,
        rounds: int = 0,
    ) -> None:
        """`rounds`: per episode (0: `cfg.episode_rounds`)."""
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
        self.rounds = rounds or cfg.episode_rounds
        self.observation_space: gym.spaces.Space[Any] = gym.spaces.Dict(
            {
                "device": gym.spaces.Box(-np.inf, np.inf, (self.n, DEVICE_FEATURES)),
                "option": gym.spaces.Box(-np.inf, np.inf, (self.n, self.k + 1, OPTION_FEATURES)),
                "glob": gym.spaces.Box(-np.inf, np.inf, (GLOBAL_FEATURES,)),
            }
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
        self.situation.option_s = option_seconds(
            self.profiles,
            self.levels,
            self.fading,
            self.situation.holding,
            self.cfg.adapter_bytes,
            self.cfg.tokens,
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
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
            holding=[[] for _ in range(self.n)],
            swap_counts=[0] * self.n,
            data_share=shares,
            round_index=0,
            rounds=self.rounds,
            ppl_ratio=1.0,
            wire_mb=np.array([lv.bytes / MiB for lv in self.levels]),
            option_s=np.zeros((self.n, self.k)),
        )
        self._draw_fading()
        return self.situation.features(), {}

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
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
        return s.features(), r, done, False, info


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


def random_env(cfg: Config, rng: np.random.Generator, max_devices: int = 32) -> EdgeEnv:
    """One pre-training episode's system, drawn so that one policy learns every fleet: 2 to
    `max_devices` devices (log-uniform), each a config profile with memory x U(0.6, 1.5),
    compute, bandwidth and distance x U(0.5, 2) and power +- 3 dB; a random non-empty subset of
    the retention curve's levels, fidelities x U(0.9, 1.1) (at most 1), emulator disk x U(0, 2);
    progress rate
    x U(0.5, 1.5); data shares from Dirichlet(`data_alpha`); 3 to `episode_rounds` rounds."""
    c = cfg.controller
    n = round(float(np.exp(rng.uniform(np.log(2), np.log(max_devices)))))
    base = cfg.devices.profiles
    profiles = []
    for i in range(n):
        p = base[int(rng.integers(len(base)))]
        profiles.append(
            replace(
                p,
                name=f"{p.name}-{i}",
                memory_mb=p.memory_mb * rng.uniform(0.6, 1.5),
                gflops=p.gflops * rng.uniform(0.5, 2.0),
                bandwidth_mhz=p.bandwidth_mhz * rng.uniform(0.5, 2.0),
                distance_m=p.distance_m * rng.uniform(0.5, 2.0),
                power_dbm=p.power_dbm + rng.uniform(-3.0, 3.0),
                disk_mb=p.disk_mb * rng.uniform(0.0, 2.0),
            )
        )
    keeps = sorted({pt.keep for pt in c.curve if pt.keep < 1.0}, reverse=True)
    chosen = sorted(rng.choice(keeps, int(rng.integers(1, len(keeps) + 1)), replace=False))
    levels = [
        replace(lv, fidelity=min(1.0, lv.fidelity * rng.uniform(0.9, 1.1)))
        for lv in levels_of(c, [float(k) for k in reversed(chosen)])
    ]
    jittered = replace(c, eta=c.eta * rng.uniform(0.5, 1.5))
    rounds = int(rng.integers(3, max(c.episode_rounds, 3) + 1))
    return EdgeEnv(profiles, levels, jittered, rounds=rounds)
