"""The baseline controllers on a hand-made environment, and every controller from the config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedpeat.config import compose
from strategies.control.controllers import (
    Fixed,
    Greedy,
    Oort,
    RandomController,
    best_fitting,
    make_controller,
)
from strategies.control.edge_env import make_env
from tests.helpers import hand_env


def test_baselines_act_as_documented() -> None:
    env = hand_env()
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


def test_oort_by_hand() -> None:
    env = hand_env()
    env.reset(seed=0)
    s = env.situation
    assert s is not None
    # Device 0 fits both levels (best: level 0, option 1), device 1 only level 1 (option 2).
    s.option_s = np.array([[10.0, 5.0], [8.0, 40.0]])  # t = 10 and 40; T = median = 25
    s.data_share = np.array([0.5, 0.5])
    options, utility = Oort(0.5, 2.0, 0.0, 0).utilities(s)
    assert options == [1, 2]
    # device 1 is slower than T: 0.5 x (25 / 40) ** 2
    np.testing.assert_allclose(utility, [0.5, 0.5 * (25 / 40) ** 2])
    assert Oort(0.5, 2.0, 0.0, 0).act(s) == [1, 0]
    s.data_share = np.array([0.1, 0.9])  # 0.9 x 0.390625 = 0.352 > 0.1: its data outweighs
    assert Oort(0.5, 2.0, 0.0, 0).act(s) == [0, 2]
    assert Oort(0.5, 0.0, 0.0, 0).utilities(s)[1].tolist() == [0.1, 0.9]  # no penalty
    assert Oort(1.0, 2.0, 0.0, 0).act(s) == [1, 2]
    # Exploration: the one slot goes to a device drawn at random, seeded.
    picks = {tuple(Oort(0.5, 2.0, 1.0, seed).act(s)) for seed in range(20)}
    assert picks == {(1, 0), (0, 2)}


def test_default_environment_and_controllers_compose() -> None:
    cfg = compose("controller=ppo")
    env = make_env(cfg)
    assert env.n == 6 and env.k == 3
    assert [lv.keep for lv in env.levels] == cfg.emulator.levels
    for name in ("fixed", "random", "greedy", "oort", "ppo"):
        c = make_controller(replace(cfg.controller, name=name), cfg.emulator.levels, 6, 0)
        assert c.name == name
    with pytest.raises(FileNotFoundError, match="controller.ppo.checkpoint"):
        make_controller(cfg.controller, cfg.emulator.levels, 6, 0, checkpoint=_missing())


def _missing():  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path("does/not/exist/ppo.pt")


def test_pretraining_repeats_bit_for_bit_and_one_checkpoint_runs_any_fleet(tmp_path) -> None:
    import torch

    from strategies.control.pretrain import pretrain

    cfg = compose(
        "controller=ppo controller.ppo.total_steps=64 controller.ppo.rollout_steps=32 "
        "controller.ppo.hidden=16"
    )
    states = []
    for run in ("a", "b"):
        pretrain(cfg, tmp_path / run, log=lambda _: None)
        states.append(torch.load(tmp_path / run / "ppo.pt", weights_only=False)["learner"]["net"])
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0)
    for n, keeps in ((2, [0.4]), (64, [0.4, 0.3, 0.2]), (9, [0.3, 0.2])):
        sized = replace(cfg, emulator=replace(cfg.emulator, levels=keeps))
        env = make_env(sized, n_devices=n)
        env.reset(seed=0)
        assert env.situation is not None
        c = make_controller(cfg.controller, keeps, n, 0, checkpoint=tmp_path / "a" / "ppo.pt")
        action = c.act(env.situation)
        assert len(action) == n and all(0 <= a <= len(keeps) for a in action)


def test_ppo_samples_and_learns_for_its_exploration_rounds_then_acts_greedily() -> None:
    cfg = compose(
        "controller=ppo controller.ppo.hidden=8 controller.ppo.explore_rounds=3 "
        "controller.ppo.online_every=2"
    )
    env = make_env(cfg)
    env.reset(seed=0)
    c = make_controller(cfg.controller, cfg.emulator.levels, 6, 0)
    stats = []
    for _ in range(5):
        assert env.situation is not None
        action = c.act(env.situation)
        _, r, done, _, _ = env.step(np.asarray(action))
        stats.append(c.feedback(r, done, env.situation))
    # Rounds 1-3 sampled: an update after 2 transitions, 1 collected; rounds 4-5 greedy.
    assert stats[0] == {"collected": 1.0}
    assert stats[1]["transitions"] == 2.0 and "policy_loss" in stats[1]
    assert stats[2] == {"collected": 1.0}
    assert stats[3] == {} and stats[4] == {}
    assert c.updates == 1  # type: ignore[attr-defined]


def test_the_shipped_policy_is_the_default_configs() -> None:
    """`strategies/control/ppo.pt` is what `python -m strategies.control pretrain` makes from
    the default config and seed: a change to either must ship a new policy."""
    from dataclasses import asdict

    import torch

    from strategies.control.pretrain import SHIPPED

    cfg = compose("controller=ppo")
    assert cfg.controller.ppo.checkpoint == "strategies/control/ppo.pt"
    ckpt = torch.load(SHIPPED, map_location="cpu", weights_only=False)
    recorded = {**ckpt["controller"], "ppo": {**ckpt["controller"]["ppo"], "checkpoint": ""}}
    expected = asdict(cfg.controller)
    expected["ppo"]["checkpoint"] = ""
    assert recorded == expected
    assert ckpt["seed"] == cfg.seed
    assert ckpt["devices"] == [asdict(p) for p in cfg.devices.profiles]
    assert SHIPPED.stat().st_size < 1_000_000


def test_the_round_records_whether_the_policy_sampled_or_acted_greedily() -> None:
    from strategies.control.online import OnlineControl

    cfg = compose(
        "controller=ppo controller.ppo.checkpoint='' controller.ppo.explore_rounds=1 "
        "controller.ppo.online_every=1"
    )
    control = OnlineControl(cfg, None, 1e5, False)
    nodes = list(range(6))
    control.start(nodes, dict(enumerate(cfg.devices.profiles)), dict.fromkeys(nodes, 1))
    assert control.decided is None
    control.act([[] for _ in nodes])
    assert control.decided == "ppo-sampled"
    control.act([[] for _ in nodes])
    assert control.decided == "ppo-greedy"


def test_the_policy_samples_only_the_rounds_an_update_in_the_run_learns_from() -> None:
    from strategies.control.controllers import explore_limit

    assert explore_limit(100, 8, 3) == 0  # the default run: shorter than one update
    assert explore_limit(100, 8, 20) == 16  # rounds 17-20 would never be learnt from
    assert explore_limit(5, 2, 20) == 5  # the schedule ends first
    assert explore_limit(100, 8, 0) == 100  # open-ended (pre-training's comparison)
    assert explore_limit(3, 1, 2) == 2


def test_a_run_shorter_than_one_update_acts_greedily() -> None:
    from strategies.control.online import OnlineControl

    cfg = compose("controller=ppo controller.ppo.checkpoint='' rounds=3")
    assert cfg.controller.ppo.online_every > cfg.rounds
    control = OnlineControl(cfg, None, 1e5, False)
    nodes = list(range(6))
    control.start(nodes, dict(enumerate(cfg.devices.profiles)), dict.fromkeys(nodes, 1))
    for _ in range(3):
        control.act([[] for _ in nodes])
        assert control.decided == "ppo-greedy"
