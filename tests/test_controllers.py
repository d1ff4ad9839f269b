"""The baseline controllers on a hand-made environment, and every controller from the config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedpeat.config import compose
from strategies.control.controllers import (
    Fixed,
    Greedy,
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


def test_default_environment_and_controllers_compose() -> None:
    cfg = compose("controller=ppo")
    env = make_env(cfg)
    assert env.n == 6 and env.k == 3
    assert [lv.keep for lv in env.levels] == cfg.emulator.levels
    for name in ("fixed", "random", "greedy", "ppo"):
        c = make_controller(replace(cfg.controller, name=name), cfg.emulator.levels, 6, 0)
        assert c.name == name
    with pytest.raises(FileNotFoundError, match="controller.ppo.checkpoint"):
        make_controller(cfg.controller, cfg.emulator.levels, 6, 0, checkpoint=_missing())


def _missing():  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path("does/not/exist/ppo.pt")
