"""Every file in conf/ composes and validates; bad values fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeat.config import CONF_DIR, Config, ConfigError, compose, to_dict, validate
from fedpeat.protocol import from_dict

# Groups whose files need a value the user must supply (`???`).
REQUIRED = {
    ("model", "hf"): ["model.path=/models/some-llama"],
    ("data", "jsonl"): ["data.path=data.jsonl"],
    ("data", "hf"): ["data.path=some/dataset"],
    ("experiment", "gsm8k"): ["data.path=data.jsonl"],
    # The default experiment's controller chooses emulators (case 1) and its planner gives each
    # device a part of the adapter, which cases 2-3 and privacy do not take.
    ("emulator", "none"): ["controller=none"],
    ("emulator", "shared"): ["controller=none"],
    ("privacy", "client_dp"): ["planner=none"],
    ("privacy", "server_dp"): ["planner=none"],
}


def group_files() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml"))


def test_every_group_has_files() -> None:
    groups = {g for g, _ in group_files()}
    assert {
        "model",
        "data",
        "partition",
        "adapter",
        "train",
        "strategy",
        "emulator",
        "devices",
        "planner",
        "controller",
        "privacy",
        "experiment",
    } <= groups


@pytest.mark.parametrize(("group", "name"), group_files())
def test_each_config_file_composes(group: str, name: str) -> None:
    cfg = compose([f"{group}={name}", *REQUIRED.get((group, name), [])])
    assert isinstance(cfg, Config)
    if group == "experiment":
        assert cfg.experiment == name


def test_default_composes_to_the_documented_default() -> None:
    cfg = compose()
    assert (cfg.model.name, cfg.model.source) == ("smollm2_135m", "gguf")
    assert (cfg.data.source, cfg.partition.kind, cfg.partition.by) == (
        "shakespeare",
        "natural",
        "play",
    )
    assert cfg.rounds == 3 and cfg.strategy.aggregation == "fedavg"
    assert cfg.export_merged and cfg.experiment == "system"
    # The whole system: the shipped policy, FedPipe planning with quantized emulators, a joint
    # program (a deadline and an upload cap derived from the fleet).
    assert cfg.controller.name == "ppo" and cfg.controller.ppo.checkpoint
    assert cfg.planner.enabled and max(cfg.planner.bits) <= 8
    assert cfg.planner.straggler_deadline and cfg.planner.upload_share > 0
    # The policy runs any level list; `fixed_level` binds only the fixed controller.
    assert compose("emulator.levels=[0.3,0.2]").emulator.levels == [0.3, 0.2]
    # Any other experiment starts from the plain defaults.
    plain = compose("experiment=tiny")
    assert not plain.planner.enabled and plain.controller.name == "none"


def test_override_string_is_shell_split() -> None:
    # Hydra needs values with braces or spaces quoted inside the override itself.
    cfg = compose("model=tiny_llama rounds=5 \"data.prompt_template='Q: {prompt} A: '\"")
    assert cfg.model.source == "tiny" and cfg.rounds == 5
    assert cfg.data.prompt_template == "Q: {prompt} A: "


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model=nope", "available: hf, llama_1b3, smollm2_135m, tiny_llama"),
        ("train.lrr=1", "train.lrr"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=-1", "train.lr=-1.0 is out of range"),
        (
            "strategy.aggregation=median",
            "strategy.aggregation='median' is not allowed; expected one of ['fedavg', 'exact', "
            "'stack']",
        ),
        ("partition.by=act", "partition.by='act' is not allowed"),
        ("data=jsonl", "data.path"),
        ("model=hf", "model.path"),
        ("adapter.target_modules=[]", "adapter.target_modules is empty"),
        ("data.server_fraction=0.9", "data.server_fraction"),
        ("rounds=0", "rounds=0 is out of range"),
        ("planner.bits=[4,3]", "planner.bits[1]=3 is not allowed; expected one of [4, 8, 16, 32]"),
        ("planner.ranks=[2,32]", "planner.ranks[1]=32 is out of range"),
        ("planner.bit_fidelity=[1.0]", "planner.bit_fidelity has 1 values for 2 planner.bits"),
        ("planner.candidates=[qkv]", "planner.candidates[0]='qkv' is not allowed"),
        ("planner.batch_sizes=[]", "planner.batch_sizes is empty"),
        ("adapter.modules=[q_proj]", "adapter.modules[0]='q_proj' is not a weight matrix name"),
        ("devices.profiles=[{gflops:0}]", "devices.profiles[0].gflops=0.0 is out of range"),
        ("controller=nope", "available: common, fixed, greedy, none, oort, ppo, random"),
        ("controller=fixed controller.fixed_level=0.5", "controller.fixed_level=0.5 is not one"),
        ("controller=ppo emulator=shared", "it needs emulator.case=1, got 2"),
        ("controller=greedy strategy.fraction_train=0.5", "the controller chooses who takes"),
        ("controller=ppo controller.curve=[]", "controller.curve has no point for"),
        ("controller=ppo controller.ppo.gamma=1.5", "controller.ppo.gamma=1.5 is out of range"),
        ("controller=ppo controller.ppo.rollout_steps=10", "multiple of ppo.minibatches"),
        ("strategy.min_replies=0", "strategy.min_replies=0 is out of range"),
        ("strategy.norm_bound=1", "would reject the median update itself"),
        ("privacy=server_dp privacy.clipping=both", "privacy.clipping='both' is not allowed"),
        ("privacy=server_dp privacy.clipping_norm=0", "privacy.clipping_norm=0.0 is out of range"),
        ("privacy=client_dp strategy.aggregation=exact", "needs strategy.aggregation=fedavg"),
        ("privacy=server_dp experiment=fedpipe", "needs planner.enabled=false"),
        ("emulator.levels=[1.0,0.4]", "emulator.levels[0] = 1.0 keeps every layer"),
        ("emulator=shared emulator.shared_level=1.0", "emulator.shared_level = 1.0 keeps every"),
        ("emulator.distill.loss=mse", "emulator.distill.loss='mse' is not allowed"),
        ("emulator.distill.loss=hidden+layerwise", "`layerwise` already includes `hidden`"),
        ("emulator.align.steps=-1", "emulator.align.steps=-1 is out of range"),
        ("emulator.align.lr=0", "emulator.align.lr=0.0 is out of range"),
        ("emulator.layer_choice=random", "emulator.layer_choice='random' is not allowed"),
        ("emulator.adapt=all", "emulator.adapt='all' is not allowed"),
        ("emulator.adapt=held experiment=fedpipe", "emulator.adapt=held with planner.enabled"),
        (
            "emulator.adapt=held privacy=server_dp planner=none",
            "emulator.adapt=held with privacy.enabled",
        ),
        ("experiment=system emulator=none", "controller=ppo chooses per-device emulators; it"),
        ("experiment=system privacy=server_dp", "privacy.enabled needs planner.enabled=false"),
        ("eval.metrics=[bleu]", "need prompt/response data to generate from"),
        ("experiment=e2e eval.metrics=[meteor]", "eval.metrics[0]='meteor' is not allowed"),
        ("devices.server_gflops=0", "devices.server_gflops=0.0 is out of range"),
        ("devices.profiles=[{disk_mb:-1}]", "devices.profiles[0].disk_mb=-1.0 is out of range"),
        ("devices.profiles=[{link_bps:-1}]", "devices.profiles[0].link_bps=-1.0 is out of range"),
        ("devices.measure_links=yes", "devices.measure_links='yes' is not allowed"),
        (
            "strategy.aggregation=stack planner=none",
            "strategy.aggregation=stack needs planner.enabled=true",
        ),
        (
            "experiment=fedpipe strategy.aggregation=stack",
            "strategy.aggregation=stack needs strategy.server_train=false",
        ),
        ("privacy=server_dp strategy.aggregation=stack", "needs strategy.aggregation=fedavg"),
    ],
)
def test_bad_values_name_the_field(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(override)
    assert needle in str(err.value)


def test_dict_round_trip() -> None:
    cfg = compose("model=tiny_llama")
    again = from_dict(Config, to_dict(cfg))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(Config, {**to_dict(cfg), "bogus": 1})


def test_validate_cross_field_rule() -> None:
    cfg = compose("model=tiny_llama")
    cfg.model.tiny.num_heads = 3
    with pytest.raises(ConfigError, match="multiple of model.tiny.num_heads"):
        validate(cfg)


def test_conf_dir_is_inside_the_project() -> None:
    assert Path(CONF_DIR, "config.yaml").is_file()


def test_case_three_may_send_the_full_model() -> None:
    # The refusal is for cases 1 and 2; case 3 has no emulator at all.
    assert compose("emulator=none controller=none emulator.levels=[1.0]").emulator.case == 3


def test_emulators_that_hold_more_than_half_are_refused_before_any_round() -> None:
    from fedpeat.server_model import ServerModel

    # The tiny model (12 layers, 1+1 adapter region): keep 0.6 holds 1 + 6 + 1 = 8 > 6 layers.
    cfg = compose("experiment=tiny emulator.levels=[0.6,0.2]")
    with pytest.raises(ValueError, match=r"emulator.levels: keep ratio 0.6 .* holds 8 of the"):
        ServerModel(cfg)
