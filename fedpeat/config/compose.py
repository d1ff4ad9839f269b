"""Composition of `conf/` with Hydra onto the typed schema, and conversions of configs."""

from __future__ import annotations

import json
import shlex
import threading
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any

from fedpeat.config.checks import ConfigError
from fedpeat.config.schema import Config, validate

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"


def _register_schema() -> None:
    """Make `conf/config.yaml`'s first default, `schema`, the typed `Config`.

    Every group file then merges onto its dataclass: each schema field can be overridden even
    when the YAML file does not mention it, and types are checked as values are set.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


_COMPOSE_LOCK = threading.Lock()


def compose(overrides: list[str] | str = "", conf_dir: Path = CONF_DIR) -> Config:
    """Compose `conf/config.yaml` with Hydra overrides and return the validated `Config`.

    `overrides` is a list of Hydra override strings or one shell-quoted string of them.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    _register_schema()
    try:
        # Hydra's instance is process-global: threads (side-by-side launches) take turns.
        with _COMPOSE_LOCK, initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg = OmegaConf.to_object(merged)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid configuration: {_explain(err)}") from err
    assert isinstance(cfg, Config)
    return validate(cfg)


def resolve_paths(cfg: Config, workdir: Path) -> Config:
    """Make relative file paths that exist under `workdir` absolute (devices may run elsewhere).

    Paths that do not exist there are left alone: hub ids look like relative paths too.
    """
    data, model = cfg.data, cfg.model
    if data.path and not Path(data.path).is_absolute() and (workdir / data.path).exists():
        data = replace(data, path=str((workdir / data.path).resolve()))
    if model.path and not Path(model.path).is_absolute() and (workdir / model.path).exists():
        model = replace(model, path=str((workdir / model.path).resolve()))
    return replace(cfg, data=data, model=model)


def _explain(err: Exception) -> str:
    """One line from a Hydra/OmegaConf error: what is wrong, the key, and the allowed options."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    head = lines[0]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    if key and key not in head:
        head += f" (key: {key})"
    if "Available options" in str(err):
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [
            ln for ln in lines[start + 1 :] if not ln.startswith(("Config search", "provider="))
        ]
        head += f"; available: {', '.join(options)}"
    if "Could not override" in head:
        head += "; the key does not exist (check its spelling and group)"
    return head


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as plain dict (for YAML/JSON and messages)."""
    assert is_dataclass(obj) and not isinstance(obj, type)
    return asdict(obj)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
