"""Pre-train the PPO controller on the edge-system environment and compare the controllers.

    python -m strategies.control pretrain [--overrides "..."] [--out runs/controller] [--ship]
    python -m strategies.control compare  [--overrides "..."] [--seeds 5] [--episodes 20]

`pretrain` writes `ppo.pt` (learner state, the controller config and seed it was trained with),
`pretrain_curve.png` and `pretrain.json` (the learning curve), and says whether the weights equal
the shipped policy's (`--ship` replaces it). `compare` evaluates fixed, random, greedy and the
pre-trained PPO policy on the same environment seeds and prints mean episode return and its
spread over seeds side by side (also `compare.md` / `compare.json`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeat.config import Config, ConfigError, compose
from strategies.control.controllers import Controller, load_learner, make_controller, new_learner
from strategies.control.edge_env import EdgeEnv, make_env, random_env
from strategies.control.ppo import Batch


def pretrain(cfg: Config, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """PPO for `controller.ppo.total_steps` steps, linear lr decay, on a new random system
    every episode (`random_env`: fleet size, profiles, levels, data shares, progress rate and
    episode length drawn from `cfg.seed`), so one policy serves any fleet and level list.
    Deterministic: the same config and seed give the same weights, bit for bit."""
    c = cfg.controller.ppo
    rng = np.random.default_rng(cfg.seed)
    env = random_env(cfg, rng)
    learner = new_learner(cfg.controller, cfg.seed)
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    updates = max(1, c.total_steps // c.rollout_steps)
    curve: list[dict[str, float]] = []
    episode_return, returns, start = 0.0, [], time.perf_counter()
    for update in range(updates):
        learner.set_lr(c.lr * (1.0 - update / updates))
        cols: dict[str, list[Any]] = {k: [] for k in ("obs", "act", "logp", "val", "rew", "done")}
        for _ in range(c.rollout_steps):
            action, logp, value = learner.act(obs)
            next_obs, r, done, _, _ = env.step(action)
            for key, v in zip(cols, (obs, action, logp, value, r, float(done)), strict=True):
                cols[key].append(v)
            episode_return += r
            obs = next_obs
            if done:
                # Per round, so episodes of different lengths compare.
                returns.append(episode_return / env.rounds)
                episode_return = 0.0
                env = random_env(cfg, rng)
                obs, _ = env.reset(seed=int(rng.integers(2**31)))
        batch = Batch(
            cols["obs"],
            cols["act"],
            np.array(cols["logp"]),
            np.array(cols["val"]),
            np.array(cols["rew"]),
            np.array(cols["done"]),
            learner.value(obs),
        )
        stats = learner.update(batch)
        row = {
            "step": (update + 1) * c.rollout_steps,
            "round_return": float(np.mean(returns[-50:])) if returns else float("nan"),
            "seconds": time.perf_counter() - start,
            **stats,
        }
        curve.append(row)
        if update % max(1, updates // 20) == 0 or update == updates - 1:
            log(
                f"[pretrain] step {row['step']:>7}/{updates * c.rollout_steps}  "
                f"return/round {row['round_return']:8.3f}  entropy {stats['entropy']:.3f}  "
                f"{row['seconds']:.0f}s"
            )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "learner": learner.state_dict(),
            "controller": asdict(cfg.controller),
            "devices": [asdict(p) for p in cfg.devices.profiles],
            "seed": cfg.seed,
        },  # no timings: the file depends on the config and seed alone
        out / "ppo.pt",
    )
    (out / "pretrain.json").write_text(json.dumps(curve, indent=1))
    _plot_curve(curve, out / "pretrain_curve.png")
    return {
        "checkpoint": str(out / "ppo.pt"),
        "final_round_return": curve[-1]["round_return"],
        "seconds": curve[-1]["seconds"],
    }


SHIPPED = Path(__file__).with_name("ppo.pt")
"""The pre-trained policy the project ships (`controller=ppo` uses it by default):
`python -m strategies.control pretrain --ship` writes it, from the default config and seed."""


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same policy weights, bit for bit."""
    net_a = torch.load(a, map_location="cpu", weights_only=False)["learner"]["net"]
    net_b = torch.load(b, map_location="cpu", weights_only=False)["learner"]["net"]
    return net_a.keys() == net_b.keys() and all(torch.equal(net_a[k], net_b[k]) for k in net_a)


def _plot_curve(curve: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in curve], [r["round_return"] for r in curve])
    ax.set_xlabel("environment steps (rounds)")
    ax.set_ylabel("return per round (mean of last 50 episodes)")
    ax.set_title("PPO pre-training on random edge systems")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_episode(env: EdgeEnv, controller: Controller, seed: int) -> dict[str, float]:
    """One episode, no learning; returns its return and totals."""
    env.reset(seed=seed)
    total = {"return": 0.0, "latency_s": 0.0, "swaps": 0.0, "violations": 0.0}
    done = False
    while not done:
        assert env.situation is not None
        action = controller.act(env.situation)
        _, r, done, _, info = env.step(np.asarray(action))
        total["return"] += r
        total["latency_s"] += info["latency_s"]
        total["swaps"] += info["swaps"]
        total["violations"] += info["memory_violations"] + info["swap_violations"]
    total["final_ppl"] = env.ppl
    return total


def compare(cfg: Config, checkpoint: Path, seeds: int, episodes: int) -> dict[str, Any]:
    """Mean episode return per controller and seed (episodes per seed share their env seeds
    across controllers), then mean and std over seeds."""
    env = make_env(cfg)
    keeps, c = cfg.emulator.levels, cfg.controller
    load_learner(checkpoint, c, cfg.seed)  # a clear error before any episode
    variants = {
        "fixed": replace(c, name="fixed"),
        "random": replace(c, name="random"),
        "greedy": replace(c, name="greedy"),
        "greedy_all": replace(c, name="greedy", greedy_fraction=1.0),
        "oort": replace(c, name="oort"),
        "ppo": replace(c, name="ppo"),  # episodes give no feedback: the policy stays as loaded
    }
    makers: dict[str, Callable[[int], Controller]] = {
        name: (lambda s, v=v: make_controller(v, keeps, env.n, s, checkpoint))  # type: ignore[misc]
        for name, v in variants.items()
    }
    table: dict[str, Any] = {}
    for name, make in makers.items():
        per_seed = []
        for seed in range(seeds):
            eps = [run_episode(env, make(seed), 10_000 * (seed + 1) + e) for e in range(episodes)]
            per_seed.append({k: float(np.mean([e[k] for e in eps])) for k in eps[0]})
        returns = [p["return"] for p in per_seed]
        table[name] = {
            "mean_return": float(np.mean(returns)),
            "std_return": float(np.std(returns)),
            **{
                f"mean_{k}": float(np.mean([p[k] for p in per_seed]))
                for k in ("latency_s", "swaps", "violations", "final_ppl")
            },
            "per_seed": returns,
        }
    return table


def table_markdown(table: dict[str, Any], seeds: int, episodes: int) -> str:
    lines = [
        f"Mean episode return over {seeds} seeds x {episodes} episodes (higher is better)",
        "",
        "| controller | return (mean +- std over seeds) | latency s / episode | swaps "
        "| violations | final ppl |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['mean_return']:.3f} +- {row['std_return']:.3f} "
            f"| {row['mean_latency_s']:.0f} | {row['mean_swaps']:.2f} "
            f"| {row['mean_violations']:.2f} | {row['mean_final_ppl']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strategies.control",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["pretrain", "compare"])
    parser.add_argument("--overrides", default="", help="Hydra overrides, space separated")
    parser.add_argument("--out", default="runs/controller", help="output directory")
    parser.add_argument("--checkpoint", default="", help="compare: policy (default OUT/ppo.pt)")
    parser.add_argument(
        "--ship", action="store_true", help="pretrain: also replace the shipped policy"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args(argv)
    # A 64-wide MLP on single observations: thread hand-offs cost more than they save.
    torch.set_num_threads(1)
    try:
        cfg = compose(f"controller=ppo {args.overrides}".strip())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.command == "pretrain":
        result = pretrain(cfg, out)
        if args.ship:
            shutil.copyfile(out / "ppo.pt", SHIPPED)
        elif SHIPPED.is_file():
            result["same_weights_as_shipped"] = same_weights(out / "ppo.pt", SHIPPED)
        print(json.dumps(result, indent=1))
        return 0
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / "ppo.pt"
    try:
        table = compare(cfg, checkpoint, args.seeds, args.episodes)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    md = table_markdown(table, args.seeds, args.episodes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=1))
    print(md)
    return 0
