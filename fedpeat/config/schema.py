"""The root of the composed configuration and the rules that join its sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeat.config.checks import ConfigError, check_range
from fedpeat.config.control import ControllerConfig, DevicesConfig, PlannerConfig
from fedpeat.config.sections import (
    AdapterConfig,
    DataConfig,
    EmulatorConfig,
    EvalConfig,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    StrategyConfig,
    TrainConfig,
)


@dataclass
class Config:
    """Root of the composed configuration (conf/config.yaml)."""

    experiment: str = "default"
    rounds: int = 3
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    export_merged: bool = True
    """Also write `merged/`: the full model with the adapter merged in (plain transformers)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: str = ""
    """A run directory whose checkpoint to continue from (its config must match but for
    `rounds`); the run goes on in that directory."""

    def check(self) -> None:
        """Every section's own checks, then the rules that join sections."""
        self.model.check()
        self.data.check()
        self.partition.check(self.data.source)
        self.adapter.check()
        self.train.check()
        self._check_baseline()  # before strategy's own checks: it names the experiment to use
        self.strategy.check()
        self.privacy.check()
        self.emulator.check()
        self.devices.check()
        self.eval.check()
        if self.eval.metrics and (self.data.source == "shakespeare" or self.data.text_field):
            raise ConfigError(
                f"eval.metrics={self.eval.metrics} need prompt/response data to generate from; "
                f"data={self.data.name} is plain text. Set eval.metrics=[] or use "
                "data.prompt_field/response_field"
            )
        self.planner.check()
        self.controller.check(self.emulator.levels)
        self._check_privacy()
        self._check_stack()
        self._check_adapt()
        self._check_controller()
        check_range("rounds", self.rounds, 1)

    def _check_baseline(self) -> None:
        s = self.strategy
        if s.name == "fed_ft" and (
            self.emulator.case != 3 or self.planner.enabled or s.aggregation != "fedavg"
        ):
            raise ConfigError(
                "strategy.name=fed_ft (full fine-tuning of the full model on every device) needs "
                "emulator=none (case 3), planner=none and strategy.aggregation=fedavg; "
                "use experiment=fed_ft"
            )

    def _check_privacy(self) -> None:
        if not self.privacy.enabled:
            return
        # The wrappers clip reply - global adapter tensor by tensor and calibrate the noise to
        # a uniform mean of same-shape updates: a linear aggregate of the full global adapter.
        if self.strategy.aggregation != "fedavg":
            raise ConfigError(
                "privacy.enabled needs strategy.aggregation=fedavg: the exact rule's SVD is not "
                "a linear function of the clipped updates, so the noise would not cover it"
            )
        if self.planner.enabled:
            raise ConfigError(
                "privacy.enabled needs planner.enabled=false: devices must train the whole "
                "global adapter for the update clipping to apply; add planner=none (the default "
                "experiment plans)"
            )
        if self.strategy.name == "fed_ft":
            raise ConfigError("privacy.enabled is for adapter updates, not strategy.name=fed_ft")

    def _check_stack(self) -> None:
        if self.strategy.aggregation != "stack":
            return
        # Stacking places each device's block of its planned rank; the server's own update is
        # a change of the whole global adapter, not a block, so it has no place in the stack.
        if not self.planner.enabled:
            raise ConfigError(
                "strategy.aggregation=stack needs planner.enabled=true (per-device ranks and "
                "modules to stack); use experiment=fedpipe or planner=fedpipe"
            )
        if self.strategy.server_train:
            raise ConfigError(
                "strategy.aggregation=stack needs strategy.server_train=false: the server's "
                "update changes the whole global adapter and cannot be stacked as a block"
            )

    def _check_adapt(self) -> None:
        if self.emulator.case == 3 or self.emulator.adapt == "region":
            return
        # Under `held` a device trains the global adapter's layers its emulator holds: a
        # subset that differs by level, which the planner's module choice and the privacy
        # wrappers' whole-adapter clipping do not model.
        for section, on in (("planner", self.planner.enabled), ("privacy", self.privacy.enabled)):
            if on:
                raise ConfigError(
                    f"emulator.adapt=held with {section}.enabled=true: a device trains only the "
                    f"adapter layers its emulator holds, which {section} does not support; use "
                    f"emulator.adapt=region or {section}=none"
                )

    def _check_controller(self) -> None:
        name = self.controller.name
        if name == "none":
            return
        if self.emulator.case != 1:
            raise ConfigError(
                f"controller={name} chooses per-device emulators; it needs "
                f"emulator.case=1, got {self.emulator.case}; add controller=none (the default "
                "experiment runs the shipped policy)"
            )
        if self.strategy.fraction_train != 1.0:
            raise ConfigError(
                f"strategy.fraction_train={self.strategy.fraction_train} with "
                f"controller={name}: the controller chooses who takes part; set it to 1.0"
            )


def validate(cfg: Config) -> Config:
    """Check choices, ranges and cross-field rules; raise ConfigError naming the field."""
    cfg.check()
    return cfg
