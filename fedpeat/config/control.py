"""The config sections of the devices, planning and control (device profiles, FedPipe planner,
controllers, PPO), each with its checks (see `fedpeat.config.sections` for how checks name
fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeat.config.checks import ConfigError, check_choice, check_range
from fedpeat.config.sections import BITS, PROJECTIONS

CONTROLLERS = ("none", "fixed", "random", "greedy", "oort", "ppo")


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
    disk_mb: float = 0.0
    """Disk the device gives to emulators it has received: it keeps the most recently used ones
    that fit (`fedpeat.cost.cache_keep`), always the one in use; 0: only the one in use."""
    link_bps: float = 0.0
    """The link's measured effective throughput in bit/s (deployment: the server times each
    node's exchanges, `strategies.links`); 0: the Shannon rate of the link figures above."""

    def check(self, name: str) -> None:
        """`name`: where this profile sits, e.g. `devices.profiles[0]`."""
        check_range(f"{name}.memory_mb", self.memory_mb, 0.0, lo_open=True)
        check_range(f"{name}.disk_mb", self.disk_mb, 0.0)
        check_range(f"{name}.link_bps", self.link_bps, 0.0)
        for field_name in ("gflops", "bandwidth_mhz", "distance_m"):
            check_range(f"{name}.{field_name}", getattr(self, field_name), 0.0, lo_open=True)


@dataclass
class DevicesConfig:
    """Profiles of simulated devices; device i gets profiles[i % len(profiles)]."""

    profiles: list[DeviceProfile] = field(default_factory=lambda: [DeviceProfile()])
    server_gflops: float = 200.0
    """The server's sustained throughput in GFLOP/s: its own training and evaluation are part of
    every round's modelled time."""
    from_nodes: bool = False
    """Deployment: a node's budget is the memory it detects (capped by its node config
    memory-mb); `profiles` only fill link figures a node does not report, recorded as assumed.
    False (simulation): a node's detection is the shared host's, so `profiles` give the budget."""
    measure_links: str = "auto"
    """`on`: the server times each node's train exchanges and prices its link by the measured
    throughput once it has one (`strategies.links`); `off`: the link figures alone; `auto`: on
    in deployment (`from_nodes`), off in simulation, where an exchange is a wait for a worker."""

    @property
    def measuring(self) -> bool:
        return self.measure_links == "on" or (self.measure_links == "auto" and self.from_nodes)

    def check(self) -> None:
        if not self.profiles:
            raise ConfigError("devices.profiles is empty; give at least one device profile")
        check_choice("devices.measure_links", self.measure_links, ("auto", "on", "off"))
        check_range("devices.server_gflops", self.server_gflops, 0.0, lo_open=True)
        for i, prof in enumerate(self.profiles):
            prof.check(f"devices.profiles[{i}]")


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
    """Total adapter upload the server accepts per round; 0: `upload_share` decides."""
    straggler_deadline: bool = False
    """With deadline_s 0: the round's deadline is the slowest device's fastest plan
    (`fedpeat.allocation.fleet_limits`), so no device's plan outlasts the straggler's leanest."""
    upload_share: float = 0.0
    """With upload_mb 0: the server accepts this share of what every device would upload at its
    largest plan (0: unlimited). With either limit the program is a joint one: devices compete."""
    runtime_mb: float = 0.0
    """Fixed per-process allowance added to every memory estimate (framework, allocator)."""

    def check(self) -> None:
        if not self.candidates:
            raise ConfigError("planner.candidates is empty; name at least one projection")
        for i, name in enumerate(self.candidates):
            check_choice(f"planner.candidates[{i}]", name, PROJECTIONS)
        check_range("planner.calibration_batches", self.calibration_batches, 1)
        check_range("planner.budget_fraction", self.budget_fraction, 0.0, 1.0, lo_open=True)
        check_range("planner.server_rank", self.server_rank, 1)
        for name in ("ranks", "batch_sizes", "bits", "module_shares"):
            if not getattr(self, name):
                raise ConfigError(f"planner.{name} is empty; give at least one value")
        for i, r in enumerate(self.ranks):
            check_range(f"planner.ranks[{i}]", r, 1, self.server_rank)
        for i, b in enumerate(self.batch_sizes):
            check_range(f"planner.batch_sizes[{i}]", b, 1)
        for i, b in enumerate(self.bits):
            check_choice(f"planner.bits[{i}]", b, BITS)
        if len(self.bit_fidelity) != len(self.bits):
            raise ConfigError(
                f"planner.bit_fidelity has {len(self.bit_fidelity)} values for "
                f"{len(self.bits)} planner.bits; give one per bit-width"
            )
        for i, f in enumerate(self.bit_fidelity):
            check_range(f"planner.bit_fidelity[{i}]", f, 0.0, 1.0, lo_open=True)
        for i, f in enumerate(self.module_shares):
            check_range(f"planner.module_shares[{i}]", f, 0.0, 1.0, lo_open=True)
        check_range("planner.deadline_s", self.deadline_s, 0.0)
        check_range("planner.upload_mb", self.upload_mb, 0.0)
        check_range("planner.upload_share", self.upload_share, 0.0, 1.0)
        check_range("planner.runtime_mb", self.runtime_mb, 0.0)


@dataclass
class CurvePoint:
    """One emulator level of the perplexity-retention curve (`python -m fedpeat.cli.retention`)."""

    keep: float = 1.0
    ppl: float = 1.0
    """Emulator perplexity on the server's held-out data."""
    bytes: float = 0.0
    """Emulator size on the wire."""
    params: int = 0
    need_mb: float = 0.0
    """Cost-model training memory at the default batch and rank."""

    def check(self, name: str) -> None:
        """`name`: where this point sits, e.g. `controller.curve[0]`."""
        check_range(f"{name}.ppl", self.ppl, 1.0)
        check_range(f"{name}.bytes", self.bytes, 0.0, lo_open=True)
        check_range(f"{name}.params", self.params, 1)
        check_range(f"{name}.need_mb", self.need_mb, 0.0, lo_open=True)


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
    total_steps: int = 400_000
    """Pre-training budget in environment steps."""
    online_every: int = 8
    """Sampled federated rounds per online update (one full batch of that many transitions;
    a run shorter than this collects without updating)."""
    online_lr: float = 1e-4
    explore_rounds: int = 100
    """Online, the policy samples its actions (and learns from them) for this many rounds of a
    run, then acts greedily and stops learning (0: greedy from the start, no online learning)."""
    checkpoint: str = ""
    """Pre-trained policy (`python -m strategies.control pretrain`); empty: train from scratch
    online (a warning says so)."""

    def check(self) -> None:
        for name in (
            "hidden",
            "epochs",
            "minibatches",
            "rollout_steps",
            "total_steps",
            "online_every",
        ):
            check_range(f"controller.ppo.{name}", getattr(self, name), 1)
        check_range("controller.ppo.explore_rounds", self.explore_rounds, 0)
        for name in ("lr", "online_lr", "clip", "max_grad_norm"):
            check_range(f"controller.ppo.{name}", getattr(self, name), 0.0, lo_open=True)
        for name in ("gamma", "gae_lambda"):
            check_range(f"controller.ppo.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("ent_coef", "vf_coef"):
            check_range(f"controller.ppo.{name}", getattr(self, name), 0.0)
        if self.rollout_steps % self.minibatches:
            raise ConfigError("controller.ppo.rollout_steps must be a multiple of ppo.minibatches")


@dataclass
class ControllerConfig:
    """Who takes part each round and with which emulator (FedPEAT's orchestrator), and the
    edge-system model it is trained and scored on."""

    name: str = "none"
    """`none`: every sampled device, level by emulator.case; `fixed`, `random`, `greedy`,
    `oort`, `ppo` choose per round who takes part and at which level (needs emulator.case=1)."""
    fixed_level: float = 0.4
    """`fixed`: the level every device gets."""
    greedy_fraction: float = 0.5
    """`greedy`: share of devices (best channels first) that take part."""
    oort_fraction: float = 0.5
    """`oort`: share of devices that take part (highest utility first)."""
    oort_alpha: float = 2.0
    """`oort`: straggler penalty exponent: a device slower than the round's preferred duration T
    has its utility multiplied by (T / t) ** alpha (Oort's default 2)."""
    oort_explore: float = 0.1
    """`oort`: share of the chosen slots given to other devices at random (exploration)."""
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

    def check(self, levels: list[float]) -> None:
        """`levels`: emulator.levels, which the curve and `fixed_level` must cover."""
        check_choice("controller.name", self.name, CONTROLLERS)
        if self.name == "none":
            return
        if self.name == "fixed" and self.fixed_level not in levels:  # only `fixed` uses it
            raise ConfigError(
                f"controller.fixed_level={self.fixed_level!r} is not one of emulator.levels "
                f"{levels}"
            )
        check_range("controller.greedy_fraction", self.greedy_fraction, 0.0, 1.0, lo_open=True)
        check_range("controller.oort_fraction", self.oort_fraction, 0.0, 1.0, lo_open=True)
        check_range("controller.oort_alpha", self.oort_alpha, 0.0)
        check_range("controller.oort_explore", self.oort_explore, 0.0, 1.0)
        for name in ("w_ppl", "w_latency", "w_swaps", "memory_penalty", "swap_penalty"):
            check_range(f"controller.{name}", getattr(self, name), 0.0)
        check_range("controller.swap_share", self.swap_share, 0.0, 1.0)
        check_range("controller.target_ppl", self.target_ppl, 1.0)
        check_range("controller.episode_rounds", self.episode_rounds, 1)
        check_range("controller.floor_share", self.floor_share, 0.0, 1.0)
        check_range("controller.eta", self.eta, 0.0, lo_open=True)
        check_range("controller.beta", self.beta, 0.0, lo_open=True)
        check_range("controller.data_alpha", self.data_alpha, 0.0)
        check_range("controller.tokens", self.tokens, 1)
        check_range("controller.adapter_bytes", self.adapter_bytes, 0.0)
        check_range("controller.ppl_full", self.ppl_full, 1.0)
        keeps = sorted(p.keep for p in self.curve)
        missing = [lv for lv in levels if lv not in keeps]
        if missing:
            raise ConfigError(
                f"controller.curve has no point for emulator.levels {missing}; "
                "regenerate it with `python -m fedpeat.cli.retention --yaml`"
            )
        for i, p in enumerate(self.curve):
            p.check(f"controller.curve[{i}]")
        self.ppo.check()
