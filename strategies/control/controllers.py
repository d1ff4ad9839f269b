"""Controllers: per round, skip or an emulator level for every device (0 skip, k level k-1).

`fixed`, `random`, `greedy` and `oort` are the baselines; `ppo` wraps the learner and keeps the
transitions it is fed back, updating every few of them. All act on a `Situation`, which the
environment and the federated strategy fill the same way.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedpeat.config import ControllerConfig
from strategies.control.edge_env import Obs, Situation
from strategies.control.ppo import Batch, PPOLearner

log = logging.getLogger(__name__)


class Controller(Protocol):
    name: str

    def act(self, s: Situation) -> list[int]:
        """Per device: 0 skip, k >= 1 take part with level k-1."""
        ...

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        """The outcome of the last action; learning controllers may update (returns stats)."""
        ...


class Fixed:
    """Every device, every round, one level."""

    name = "fixed"

    def __init__(self, level_index: int) -> None:
        self.option = level_index + 1

    def act(self, s: Situation) -> list[int]:
        return [self.option] * len(s.memory_mb)

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        return {}


class RandomController:
    """Skip or any level, uniformly per device (seeded)."""

    name = "random"

    def __init__(self, n_levels: int, seed: int) -> None:
        self.k, self.rng = n_levels, np.random.default_rng(seed)

    def act(self, s: Situation) -> list[int]:
        return [int(a) for a in self.rng.integers(0, self.k + 1, len(s.memory_mb))]

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        return {}


def best_fitting(s: Situation, i: int) -> int:
    """Option (level index + 1) of the highest-fidelity level device i can hold; 0 if none."""
    fits = [k for k in range(len(s.need_mb)) if s.need_mb[k] <= s.memory_mb[i]]
    return 1 + max(fits, key=lambda k: s.fidelity[k]) if fits else 0


class Greedy:
    """The `fraction` of devices with the best channel, each at its best fitting level."""

    name = "greedy"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def act(self, s: Situation) -> list[int]:
        n = len(s.memory_mb)
        chosen = np.argsort(-s.gain_db, kind="stable")[: max(1, math.ceil(self.fraction * n))]
        action = [0] * n
        for i in chosen:
            action[int(i)] = best_fitting(s, int(i))
        return action

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        return {}


class Oort:
    """Oort-style selection (statistical utility x system speed; conf/controller/oort.yaml)."""

    name = "oort"

    def __init__(self, fraction: float, alpha: float, explore: float, seed: int) -> None:
        self.fraction, self.alpha, self.explore = fraction, alpha, explore
        self.rng = np.random.default_rng(seed)

    def utilities(self, s: Situation) -> tuple[list[int], np.ndarray]:
        """Per device: its best fitting option (0: none fits) and its utility (0 where none
        fits): data share x (T / t) ** alpha where t > T, T the median t of fitting devices."""
        n = len(s.memory_mb)
        options = [best_fitting(s, i) for i in range(n)]
        t = np.array([s.option_s[i, o - 1] if o else np.inf for i, o in enumerate(options)])
        fits = np.array([o > 0 for o in options])
        if not fits.any():
            return options, np.zeros(n)
        pace = float(np.median(t[fits]))
        penalty = np.where(t > pace, (pace / np.where(fits, t, 1.0)) ** self.alpha, 1.0)
        return options, np.where(fits, s.data_share * penalty, 0.0)

    def act(self, s: Situation) -> list[int]:
        options, utility = self.utilities(s)
        fitting = [i for i in range(len(options)) if options[i]]
        k = min(len(fitting), max(1, math.ceil(self.fraction * len(options))))
        ranked = sorted(fitting, key=lambda i: (-utility[i], i))
        explore = min(round(self.explore * k), len(fitting) - k)
        chosen = ranked[: k - explore]
        rest = ranked[k - explore :]
        if explore > 0:
            chosen += [rest[j] for j in self.rng.choice(len(rest), explore, replace=False)]
        action = [0] * len(options)
        for i in chosen:
            action[i] = options[i]
        return action

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        return {}


def explore_limit(explore_rounds: int, every: int, run_rounds: int) -> int:
    """How many rounds the policy samples: its first `explore_rounds`, but only those whose
    transitions an update inside the run learns from (a whole batch of `every`). A sampled
    action is worse on average than the greedy one; it is worth its cost only when learnt
    from, so a run shorter than one update acts greedily throughout. `run_rounds` 0: no end."""
    if run_rounds <= 0:
        return explore_rounds
    return min(explore_rounds, run_rounds - run_rounds % max(every, 1))


class PPOController:
    """The learner online (FedPEAT's online orchestration). For its first `explore_limit`
    rounds it samples its actions from the policy, so the transitions are on-policy, and
    updates from every `every` of them in one full batch; after that it acts greedily (the
    most probable option per device) and no longer learns."""

    name = "ppo"

    def __init__(
        self, learner: PPOLearner, every: int, lr: float, explore_rounds: int, run_rounds: int = 0
    ) -> None:
        self.learner, self.every = learner, every
        self.explore_rounds = explore_limit(explore_rounds, every, run_rounds)
        self.learner.set_lr(lr)
        self._obs: list[Obs] = []
        self._act: list[np.ndarray] = []
        self._logp: list[float] = []
        self._val: list[float] = []
        self._rew: list[float] = []
        self._done: list[float] = []
        self.rounds = 0
        self.updates = 0

    @property
    def exploring(self) -> bool:
        return self.rounds < self.explore_rounds

    def act(self, s: Situation) -> list[int]:
        obs = s.features()
        action, logp, value = self.learner.act(obs, greedy=not self.exploring)
        if self.exploring:
            self._obs.append(obs)
            self._act.append(action)
            self._logp.append(logp)
            self._val.append(value)
        self.rounds += 1
        return [int(a) for a in action]

    def feedback(self, reward: float, done: bool, next_s: Situation) -> dict[str, float]:
        if len(self._rew) == len(self._obs):  # a greedy round: nothing to learn from
            return {}
        self._rew.append(reward)
        self._done.append(float(done))
        if len(self._rew) < self.every:
            return {"collected": float(len(self._rew))}
        batch = Batch(
            list(self._obs),
            list(self._act),
            np.array(self._logp),
            np.array(self._val),
            np.array(self._rew),
            np.array(self._done),
            self.learner.value(next_s.features()),
        )
        stats = self.learner.update(batch, minibatches=1)
        self.updates += 1
        for buf in (self._obs, self._act, self._logp, self._val, self._rew, self._done):
            buf.clear()
        return {**stats, "transitions": float(len(batch.obs))}

    def state_dict(self) -> dict[str, object]:
        return {"learner": self.learner.state_dict(), "updates": self.updates}


def new_learner(cfg: ControllerConfig, seed: int) -> PPOLearner:
    return PPOLearner(cfg.ppo, seed)


def load_learner(path: Path, cfg: ControllerConfig, seed: int) -> PPOLearner:
    """The pre-trained learner at `path` (any fleet size and level list)."""
    learner = new_learner(cfg, seed)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"controller.ppo.checkpoint: no file at {path}; pre-train one with "
            "`python -m strategies.control pretrain`"
        ) from err
    try:
        learner.load_state_dict(ckpt["learner"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"controller.ppo.checkpoint {path}: {err}") from err
    return learner


def make_controller(
    cfg: ControllerConfig,
    keeps: list[float],
    n_devices: int,
    seed: int,
    checkpoint: Path | None = None,
    run_rounds: int = 0,
) -> Controller:
    """The configured controller for `n_devices` devices and levels `keeps`, in a run of
    `run_rounds` rounds (0: open-ended, as in pre-training's comparison)."""
    k = len(keeps)
    if cfg.name == "fixed":
        return Fixed(keeps.index(cfg.fixed_level))
    if cfg.name == "random":
        return RandomController(k, seed)
    if cfg.name == "greedy":
        return Greedy(cfg.greedy_fraction)
    if cfg.name == "oort":
        return Oort(cfg.oort_fraction, cfg.oort_alpha, cfg.oort_explore, seed)
    if cfg.name == "ppo":
        if checkpoint is None:
            log.warning("controller=ppo without a checkpoint: the policy starts untrained")
            learner = new_learner(cfg, seed)
        else:
            learner = load_learner(checkpoint, cfg, seed)
        p = cfg.ppo
        return PPOController(learner, p.online_every, p.online_lr, p.explore_rounds, run_rounds)
    raise ValueError(f"controller.name={cfg.name!r} has no controller object")
