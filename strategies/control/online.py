"""The controller inside a federated run: observe, act, price the round, learn from its outcome.

The strategy owns one `OnlineControl`. Before a round it asks for the action (per node: skip or a
level); after the server has evaluated the plug-in model it feeds back the measured perplexity,
and the round's modelled latency, swaps and violations become the reward of the transition
(the PPO controller updates online every `controller.ppo.online_every` rounds). With
`controller=none` the levels come from `emulator.case` as before, and the round is priced the
same way, so every run reports modelled latency and time to target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeat.config import Config, DeviceProfile
from fedpeat.cost import Level, MiB, RoundOutcome, Weights, gains_db, price_round, reward
from strategies.control.controllers import Controller, make_controller
from strategies.control.edge_env import Situation, option_seconds


@dataclass
class Transition:
    """One round as the controller saw it (a metrics-row fragment)."""

    action: dict[int, int]
    outcome: RoundOutcome
    reward: float | None = None
    learn: dict[str, float] = field(default_factory=dict)


class OnlineControl:
    """Device order is fixed at the first round (nodes sorted by partition id), so device i of
    the policy is `devices.profiles[i % len]` as in the environment it was pre-trained on."""

    def __init__(
        self,
        cfg: Config,
        checkpoint: Path | None,
        adapter_bytes: float,
        full_finetune: bool = False,
    ) -> None:
        """`adapter_bytes`: the real state size each way per device (under fed_ft the model);
        the levels are set at the first round, when the server can price them."""
        self.cfg, self.levels = cfg, list[Level]()
        self.adapter_bytes, self.full_finetune = adapter_bytes, full_finetune
        c = cfg.controller
        self.weights = Weights(
            c.w_ppl, c.w_latency, c.w_swaps, c.memory_penalty, c.swap_penalty, c.swap_share
        )
        self.checkpoint = checkpoint
        self.rng = np.random.default_rng(cfg.seed + 7919)  # fading draws, apart from sampling
        self.nodes: list[int] = []
        self.profiles: list[DeviceProfile] = []
        self.decided: str | None = None
        """How this round's action was chosen: `ppo-sampled` or `ppo-greedy` (the policy
        explores, or acts on its most probable options), else the rule's name; None without a
        controller."""
        self.shares = np.zeros(0)
        self.swap_counts: list[int] = []
        self.controller: Controller | None = None
        self.fading = np.zeros(0)
        self.round_index = 0
        self.ppl0: float | None = None
        self.ppl_ratio = 1.0
        self.pending: Transition | None = None
        self.history: list[Transition] = []
        self.server_s = 0.0
        """The server's own compute per round (`fedpeat.cost.server_compute_s`), set by the
        strategy, which knows the model's size."""

    # ------------------------------------------------------------------ set-up

    def start(
        self, nodes: list[int], profiles: Mapping[int, DeviceProfile], sizes: Mapping[int, int]
    ) -> None:
        if self.nodes:
            return
        self.nodes = list(nodes)
        self.profiles = [profiles[n] for n in nodes]
        total = sum(sizes[n] for n in nodes) or 1
        self.shares = np.array([sizes[n] / total for n in nodes], dtype=np.float64)
        self.swap_counts = [0] * len(nodes)
        if self.cfg.controller.name != "none":
            self.controller = make_controller(
                self.cfg.controller,
                list(self.cfg.emulator.levels),
                len(nodes),
                self.cfg.seed,
                self.checkpoint,
                self.cfg.rounds,
            )
        self._draw()

    def measured(self, links: Mapping[int, float]) -> None:
        """Node -> measured link throughput (bit/s; 0: none yet): the cost model and the
        policy's per-option seconds use it from the next round on."""
        self.profiles = [
            replace(p, link_bps=links.get(n, 0.0) or p.link_bps)
            for n, p in zip(self.nodes, self.profiles, strict=True)
        ]

    def _draw(self) -> None:
        self.fading = self.rng.exponential(1.0, len(self.nodes))

    def holding(
        self, holdings: Mapping[int, set[str]], digests: Mapping[float, str]
    ) -> list[list[int]]:
        """Per device: the options (level index + 1) of the emulators it holds. The device's
        reply says what it keeps after each round, so their order of use does not matter here."""
        keys = [digests.get(lv.keep) for lv in self.levels]
        return [[k + 1 for k, d in enumerate(keys) if d in holdings.get(n, ())] for n in self.nodes]

    def situation(self, holding: list[list[int]]) -> Situation:
        return Situation(
            gain_db=gains_db(self.profiles, self.fading),
            memory_mb=np.array([p.memory_mb for p in self.profiles], dtype=np.float64),
            need_mb=np.array([lv.need_mb for lv in self.levels]),
            fidelity=np.array([lv.fidelity for lv in self.levels]),
            holding=[list(h) for h in holding],
            swap_counts=list(self.swap_counts),
            data_share=self.shares,
            round_index=self.round_index,
            rounds=self.cfg.rounds,
            ppl_ratio=self.ppl_ratio,
            wire_mb=np.array([lv.bytes / MiB for lv in self.levels]),
            option_s=option_seconds(
                self.profiles, self.levels, self.fading, holding, self.adapter_bytes, self._tokens
            ),
        )

    # ------------------------------------------------------------------ round

    def act(self, holding: list[list[int]]) -> dict[int, int] | None:
        """Node -> option (0 skip, k level k-1); None when no controller (emulator.case) or
        no device to choose from (none has sent its profile yet)."""
        if self.controller is None or not self.nodes:
            self.decided = None
            return None
        # Before acting: the round that ends the exploration schedule still samples.
        exploring = getattr(self.controller, "exploring", None)
        mode = "ppo-sampled" if exploring else "ppo-greedy"
        self.decided = self.controller.name if exploring is None else mode
        action = self.controller.act(self.situation(holding))
        return dict(zip(self.nodes, action, strict=True))

    def price(
        self,
        options: Mapping[int, int],
        holding: list[list[int]],
        violations: int = 0,
        work: Mapping[int, tuple[float, float]] | None = None,
    ) -> Transition:
        """Model the round the strategy is about to run: `options` are the devices actually
        sent work; `violations` those the controller chose but that cannot hold their level;
        `work`: node -> (adapter bytes each way, tokens trained) of its own plan, where it has
        one (otherwise the global adapter and `train.batch_size`)."""
        action = [int(options.get(n, 0)) for n in self.nodes]
        work = work or {}
        default = (self.adapter_bytes, self._tokens)
        adapter_bytes = [work.get(n, default)[0] for n in self.nodes]
        tokens = [work.get(n, default)[1] for n in self.nodes]
        outcome = price_round(
            action,
            self.profiles,
            self.levels,
            self.fading,
            [list(h) for h in holding],
            self.swap_counts,  # updated in place: the devices' swap history
            self.round_index,
            self.weights,
            adapter_bytes,
            tokens,
            check_memory=False,
            full_finetune=self.full_finetune,
            server_s=self.server_s,
        )
        outcome.memory_violations += violations
        self.pending = Transition(dict(zip(self.nodes, action, strict=True)), outcome)
        return self.pending

    def price_sent(
        self,
        levels_sent: Mapping[int, float],
        holding: list[list[int]],
        violations: int = 0,
        full_model: bool = False,
        work: Mapping[int, tuple[float, float]] | None = None,
    ) -> Transition:
        """`price` for the levels the strategy sent (node -> keep ratio). `holding` as the round
        began; `full_model` (case 3): devices hold the full model, nothing is downloaded;
        `work` as in `price`."""
        keeps = [lv.keep for lv in self.levels]
        sent = {n: keeps.index(lv) + 1 for n, lv in levels_sent.items() if lv in keeps}
        if full_model:
            holding = [[sent[n]] if n in sent else [] for n in self.nodes]
        return self.price(sent, holding, violations, work)

    @property
    def _tokens(self) -> float:
        t = self.cfg.train
        return float(t.local_steps * t.batch_size * self.cfg.data.max_length)

    def feedback(
        self, ppl: float, failed: int, holding: list[list[int]] | None = None
    ) -> Transition | None:
        """The measured plug-in perplexity after the round (round 0: the base model's).
        `failed`: devices that were sent work but returned nothing usable (counted as
        violations: the controller chose them)."""
        if self.ppl0 is None:
            self.ppl0 = ppl
            return None
        t = self.pending
        if t is None:
            return None
        self.pending = None
        o = t.outcome
        t.reward = reward(
            ppl,
            self.ppl0,
            o.latency_s,
            o.swaps,
            o.memory_violations + failed,
            o.swap_violations,
            self.weights,
        )
        self.round_index += 1
        self.ppl_ratio = ppl / self.ppl0
        self._draw()
        if self.controller is not None and holding is not None:
            done = self.round_index >= self.cfg.rounds
            t.learn = self.controller.feedback(t.reward, done, self.situation(holding))
        self.history.append(t)
        return t

    def renumber(self, mapping: Mapping[int, int]) -> None:
        """Node ids changed (a resumed run): the same devices, in the same order, new ids."""
        self.nodes = [mapping.get(n, n) for n in self.nodes]
        for t in [*self.history, *([self.pending] if self.pending else [])]:
            t.action = {mapping.get(n, n): v for n, v in t.action.items()}

    def state_dict(self) -> dict[str, Any]:
        """Controller state for the run directory (policy and optimiser when PPO)."""
        state: dict[str, Any] = {"swap_counts": self.swap_counts, "round": self.round_index}
        inner = getattr(self.controller, "state_dict", None)
        if inner is not None:
            state["controller"] = inner()
        return state

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
