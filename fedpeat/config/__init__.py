"""Typed configuration: dataclass schemas for every Hydra group, their checks, composition.

`compose` builds a `Config` from `conf/` and Hydra overrides and checks it; each section's checks
sit next to its fields (`sections`, `control`), rules that join sections on `Config` (`schema`).
Everything fails here, before any model is loaded or data is read.
"""

from fedpeat.config.checks import ConfigError
from fedpeat.config.compose import (
    CONF_DIR,
    compose,
    resolve_paths,
    to_dict,
    to_json,
    to_yaml,
)
from fedpeat.config.control import (
    CONTROLLERS,
    ControllerConfig,
    CurvePoint,
    DeviceProfile,
    DevicesConfig,
    PlannerConfig,
    PPOConfig,
)
from fedpeat.config.schema import Config, validate
from fedpeat.config.sections import (
    AGGREGATIONS,
    BITS,
    PROJECTIONS,
    AdapterConfig,
    AlignConfig,
    DataConfig,
    DistillConfig,
    EmulatorConfig,
    EvalConfig,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    StrategyConfig,
    TinyModelConfig,
    TrainConfig,
)

__all__ = [
    "AGGREGATIONS",
    "BITS",
    "CONF_DIR",
    "CONTROLLERS",
    "PROJECTIONS",
    "AdapterConfig",
    "AlignConfig",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "CurvePoint",
    "DataConfig",
    "DeviceProfile",
    "DevicesConfig",
    "DistillConfig",
    "EmulatorConfig",
    "EvalConfig",
    "ModelConfig",
    "PPOConfig",
    "PartitionConfig",
    "PlannerConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TinyModelConfig",
    "TrainConfig",
    "compose",
    "resolve_paths",
    "to_dict",
    "to_json",
    "to_yaml",
    "validate",
]
