"""Per-round checkpoints of a run and `resume=<run-dir>`.

After every round the server writes `checkpoint.pt` (global adapter, strategy state: sampling
RNG, controller with policy, optimiser and buffers, privacy spent, node partitions; the global
torch, numpy and Python RNG states; the metrics rows so far; the config) through a temporary file
and an atomic rename, then `checkpoint.json` (the round, for people and scripts). A killed run
loses at most the round in flight.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeat.config import Config, ConfigError
from fedpeat.outputs import write_json_atomic

CHECKPOINT = "checkpoint.pt"
# Fields that may differ between the killed run and its continuation.
_RESUMABLE = ("rounds", "resume")


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    strategy: dict[str, Any]
    rng: dict[str, Any]
    config: dict[str, Any]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comparable(cfg: Config) -> dict[str, Any]:
    """Every config field by its dotted name, but those a continuation may change."""
    return {k: v for k, v in _flat(asdict(cfg)).items() if k not in _RESUMABLE}


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    state: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
    strategy: dict[str, Any],
    cfg: Config,
) -> None:
    payload = Checkpoint(
        server_round,
        state,
        rows,
        strategy,
        {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        _comparable(cfg),
    )
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(vars(payload), tmp)
    os.replace(tmp, run_dir / CHECKPOINT)
    write_json_atomic(run_dir / "checkpoint.json", {"round": server_round, "rounds": cfg.rounds})


def restore_rngs(ckpt: Checkpoint) -> None:
    torch.set_rng_state(ckpt.rng["torch"])
    np.random.set_state(ckpt.rng["numpy"])
    random.setstate(ckpt.rng["python"])


def load_checkpoint(run_dir: Path) -> Checkpoint:
    # Our own file, written by save_checkpoint: it holds the controller object (pickled).
    return Checkpoint(**torch.load(run_dir / CHECKPOINT, weights_only=False))


def open_resume(cfg: Config, workdir: Path) -> tuple[Path, Checkpoint]:
    """The run directory named by `resume` and its checkpoint, after checking that it exists,
    loads, belongs to this config (all but `rounds`) and has rounds left. Raises ConfigError
    naming the field or file otherwise; nothing is written."""
    run_dir = Path(cfg.resume)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    path = run_dir / CHECKPOINT
    if not run_dir.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no run directory at {run_dir}")
    if not path.is_file():
        raise ConfigError(
            f"resume={cfg.resume!r}: {path} does not exist (the run stopped before its first "
            "round ended, or is not a fedpeat run directory)"
        )
    try:
        ckpt = load_checkpoint(run_dir)
    except Exception as err:
        raise ConfigError(f"resume: {path} cannot be read: {type(err).__name__}: {err}") from err
    now = _comparable(cfg)
    differ = sorted(k for k in now.keys() | ckpt.config.keys() if now.get(k) != ckpt.config.get(k))
    if differ:
        raise ConfigError(
            f"resume: the config differs from the checkpointed run's in {differ}; only "
            f"{list(_RESUMABLE)} may change (pass the same overrides as the first run)"
        )
    if ckpt.round >= cfg.rounds:
        raise ConfigError(
            f"resume: {run_dir} already finished round {ckpt.round} of rounds={cfg.rounds}; "
            "raise rounds to continue it"
        )
    return run_dir, ckpt
