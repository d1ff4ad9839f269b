"""Each round's plans: which emulator level each device gets (the memory rule of
`emulator.case`, or the controller's choice), the FedPipe plan of rank, batch size, bits and
modules under the planner, and the `Plan` a device receives, built by `build_plan` alone."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import RecordDict

from fedpeat.allocation import Allocation, Option, allocate, fleet_limits, option_value
from fedpeat.config import Config, DeviceProfile
from fedpeat.cost import Level, MiB, compute_s, rate_bps, transmission_s
from fedpeat.protocol import ADAPTER_KEY, RESIDUAL_KEY, EmulatorRef, Plan
from fedpeat.server_model import ServerModel
from strategies.aggregation import (
    device_residual,
    device_share,
    stack_room,
    stack_share,
    stack_used,
)
from strategies.round_stats import to_record

# --------------------------------------------------------------------------- levels


@dataclass(frozen=True)
class Assignment:
    """A device's level for this round, or why it is skipped."""

    level: float | None
    """Keep ratio of the emulator; None with a reason: skipped. Case 3 uses 1.0, no emulator."""
    reason: str = ""


def assign_levels(
    case: int,
    memory_mb: Mapping[int, float],
    levels: list[float],
    shared_level: float,
    need_mb: Callable[[float], float],
) -> dict[int, Assignment]:
    """Case 1: the highest level whose estimated training memory fits the device's budget.
    Case 2: the shared level for every device that fits it. Case 3: the full model for all.

    `memory_mb` maps node id -> budget; `need_mb(level)` is the cost model's estimate.
    """
    out: dict[int, Assignment] = {}
    for node, budget in memory_mb.items():
        if case == 3:
            out[node] = Assignment(1.0)
            continue
        candidates = sorted(levels, reverse=True) if case == 1 else [shared_level]
        fitting = [lv for lv in candidates if need_mb(lv) <= budget]
        if fitting:
            out[node] = Assignment(fitting[0])
        else:
            smallest = min(candidates)
            out[node] = Assignment(
                None,
                f"memory budget {budget:.0f} MB < {need_mb(smallest):.0f} MB needed "
                f"by the smallest allowed emulator (keep {smallest})",
            )
    return out


def server_levels(cfg: Config, server: ServerModel) -> list[Level]:
    """The server's emulator levels as the controller prices them (real sizes and needs;
    fidelity from the configured retention curve when it is this model's)."""
    c, wire = cfg.controller, getattr(np, cfg.emulator.wire_dtype)
    curve = {p.keep: p for p in c.curve} if c.curve_model == cfg.model.name else {}
    keeps = list(cfg.emulator.levels)
    if cfg.emulator.case == 3 and 1.0 not in keeps:  # devices train the full model
        keeps.append(1.0)
    out = []
    for keep in keeps:
        shape = server.emulator_shape(keep)
        fidelity = min(1.0, c.ppl_full / curve[keep].ppl) if keep in curve else keep
        out.append(
            Level(
                keep,
                fidelity,
                float(shape.params * np.dtype(wire).itemsize),
                shape.params,
                server.memory_need_mb(keep),
            )
        )
    return out


def need_mb(cfg: Config, server: ServerModel, level: float, profile: DeviceProfile) -> float:
    """What training at `level` needs on this device: under the planner its cheapest plan."""
    if cfg.planner.enabled:
        return smallest_need_mb(server, level, profile)
    return server.memory_need_mb(level)


def choose_levels(
    cfg: Config,
    server: ServerModel,
    profiles: Mapping[int, DeviceProfile],
    sampled: list[int],
    options: Mapping[int, int] | None,
) -> tuple[dict[int, Assignment], int]:
    """Each device's level this round, and how many choices were violations.

    Without a controller (`options` None) the sampled devices get the level `emulator.case`
    gives them. With one, `options` (node -> 0 skip, k: level k-1) are kept where the device
    can hold the level; a level it cannot hold is not sent (a violation, as in the environment).
    """
    e = cfg.emulator
    if options is None:
        out: dict[int, Assignment] = {}
        for n in sampled:
            prof = profiles[n]
            out |= assign_levels(
                e.case,
                {n: prof.memory_mb},
                list(e.levels),
                e.shared_level,
                lambda lv, p=prof: need_mb(cfg, server, lv, p),  # type: ignore[misc]
            )
        return out, 0
    chosen, violations = {}, 0
    for node, option in options.items():
        if option == 0:
            chosen[node] = Assignment(None, f"{cfg.controller.name}: not chosen this round")
            continue
        level = e.levels[option - 1]
        need = need_mb(cfg, server, level, profiles[node])
        if need <= profiles[node].memory_mb:
            chosen[node] = Assignment(level)
        else:
            violations += 1
            chosen[node] = Assignment(
                None,
                f"{cfg.controller.name} chose keep {level}, which needs {need:.0f} MB "
                f"> budget {profiles[node].memory_mb:.0f} MB: not sent",
            )
    return chosen, violations


# --------------------------------------------------------------------------- FedPipe plans


@dataclass
class DevicePlan:
    """One device's plan: emulator level, rank, batch, bits and modules, with the estimates."""

    level: float
    rank: int
    batch: int
    bits: int
    share: float
    modules: list[str] = field(default_factory=list)
    compute_dtype: str = ""
    memory_mb: float = 0.0
    time_s: float = 0.0
    upload_mb: float = 0.0


def link_rate_bps(profile: DeviceProfile) -> float:
    """The device's measured throughput where there is one, else its mean Shannon rate (no
    fading: the planner plans on the average channel)."""
    return profile.link_bps or rate_bps(
        profile.bandwidth_mhz * 1e6, profile.power_dbm, profile.distance_m
    )


def importance_share(scores: Mapping[str, float], modules: list[str], chosen: list[str]) -> float:
    """Share of the chosen modules' total importance that `modules` carry."""
    total = sum(scores.get(m, 0.0) for m in chosen)
    return sum(scores.get(m, 0.0) for m in modules) / total if total > 0 else 1.0


def compute_bits(bits: int, profile: DeviceProfile, model_bits: int) -> int:
    """Width of activations and unquantized weights: bf16 for 16-bit plans, and for quantized
    ones on devices with native bf16; the model's width otherwise."""
    if bits == 16 or (bits < model_bits and profile.bf16):
        return 16
    return model_bits


def allowed_bits(pl_bits: list[int], profile: DeviceProfile) -> list[int]:
    """16-bit plans only where bf16 is native (elsewhere it is emulated, several times slower)."""
    return [b for b in pl_bits if b != 16 or profile.bf16]


def options_for(
    server: ServerModel,
    level: float,
    profile: DeviceProfile,
    data_size: int,
    emulator_bytes: float,
) -> list[Option]:
    """Every (rank, batch, bits, share) the planner allows, with memory, time, upload, value.

    `emulator_bytes` is what must still be sent to this device at `level` (0 if it holds it).
    """
    cfg = server.cfg
    pl, t = cfg.planner, cfg.train
    max_batch = max(pl.batch_sizes)
    rate = link_rate_bps(profile)
    params_emulator = server.emulator_shape(level).params
    chosen = server.adapter_cfg.modules
    bit_options = [
        (b, f)
        for b, f in zip(pl.bits, pl.bit_fidelity, strict=True)
        if b in allowed_bits(pl.bits, profile)
    ]
    out = []
    for rank in pl.ranks:
        for share in pl.module_shares:
            adapter = server.device_adapter(rank, share)
            n_adapter = server.adapter_params_of(adapter)
            importance = importance_share(server.scores, adapter.modules, chosen)
            adapter_bytes = 4.0 * n_adapter
            for batch in pl.batch_sizes:
                tokens = t.local_steps * batch * cfg.data.max_length
                seconds = compute_s(tokens, params_emulator, profile.gflops * 1e9)
                seconds += transmission_s(emulator_bytes + adapter_bytes, adapter_bytes, rate, rate)
                for bits, fidelity in bit_options:
                    width = compute_bits(bits, profile, server.model_bits)
                    out.append(
                        Option(
                            rank=rank,
                            batch=batch,
                            bits=bits,
                            share=share,
                            memory_mb=server.memory_need_mb(level, bits, batch, n_adapter, width),
                            time_s=seconds,
                            upload_mb=adapter_bytes / MiB,
                            value=option_value(
                                importance, rank, fidelity, data_size * batch / max_batch
                            ),
                        )
                    )
    return out


def smallest_need_mb(server: ServerModel, level: float, profile: DeviceProfile) -> float:
    """Memory of the cheapest plan at `level` (the level chooser's test under the planner)."""
    pl = server.cfg.planner
    adapter = server.device_adapter(min(pl.ranks), min(pl.module_shares))
    params = server.adapter_params_of(adapter)
    return min(
        server.memory_need_mb(
            level, b, min(pl.batch_sizes), params, compute_bits(b, profile, server.model_bits)
        )
        for b in allowed_bits(pl.bits, profile)
    )


def plan_devices(
    cfg: Config,
    server: ServerModel,
    levels: Mapping[int, float],
    profiles: Mapping[int, DeviceProfile],
    menus: Mapping[int, Sequence[Option]],
    limits: tuple[float, float],
) -> dict[int, DevicePlan | str]:
    """Solve the allocation program for the devices in `levels` (node -> keep ratio) over their
    `menus` (`options_for` at that level), under the derived (deadline s, upload MB) `limits`
    (`fleet_limits`); `planner.deadline_s` and `planner.upload_mb` override them."""
    budgets = {node: profiles[node].memory_mb for node in levels}
    pl = cfg.planner
    deadline, upload = limits
    allocations: dict[int, Allocation] = allocate(
        {node: menus[node] for node in levels},
        budgets,
        pl.deadline_s or deadline,
        pl.upload_mb or upload,
    )
    out: dict[int, DevicePlan | str] = {}
    for node, alloc in allocations.items():
        o = alloc.option
        if o is None:
            out[node] = alloc.reason
            continue
        out[node] = DevicePlan(
            levels[node],
            o.rank,
            o.batch,
            o.bits,
            o.share,
            server.device_adapter(o.rank, o.share).modules,
            "bfloat16" if compute_bits(o.bits, profiles[node], server.model_bits) == 16 else "",
            o.memory_mb,
            o.time_s,
            o.upload_mb,
        )
    return out


def plan_round(
    cfg: Config,
    server: ServerModel,
    profiles: Mapping[int, DeviceProfile],
    sampled: list[int],
    options: Mapping[int, int] | None,
    data_size: Callable[[int], int],
    emulator_bytes: Callable[[int, float], float],
) -> tuple[dict[int, Assignment], dict[int, DevicePlan | str], int]:
    """The round's levels (`choose_levels`) and, under the planner, each device's FedPipe plan
    (or why it has none); and the count of violations. `data_size(node)` and
    `emulator_bytes(node, level)` (what must still be sent) feed the program."""
    assignments, violations = choose_levels(cfg, server, profiles, sampled, options)
    if not cfg.planner.enabled:
        return assignments, {}, violations
    levels = {n: a.level for n, a in assignments.items() if a.level is not None}
    case3 = cfg.emulator.case == 3

    def sent(n: int, lv: float) -> float:
        return 0.0 if case3 else float(emulator_bytes(n, lv))

    # The limits are the fleet's: the chosen devices at their levels and every other sampled
    # device at the leanest level it can hold, so that they do not shrink to what the few
    # chosen devices need (one chosen device would otherwise be held to its own leanest plan).
    others = [n for n in sampled if n not in levels]
    lean = {n: lv for n in others if (lv := leanest_level(cfg, server, profiles[n]))}
    fleet = {
        n: options_for(server, lv, profiles[n], data_size(n), sent(n, lv))
        for n, lv in (levels | lean).items()
    }
    limits = fleet_limits(
        fleet,
        {n: profiles[n].memory_mb for n in fleet},
        cfg.planner.upload_share,
        cfg.planner.straggler_deadline,
    )
    plans = plan_devices(cfg, server, levels, profiles, fleet, limits)
    return assignments, plans, violations


def leanest_level(cfg: Config, server: ServerModel, profile: DeviceProfile) -> float | None:
    """The smallest level the device's case allows and it can hold (None: none fits); case 3
    is the full model, whose fit the program itself checks."""
    e = cfg.emulator
    if e.case == 3:
        return 1.0
    allowed = list(e.levels) if e.case == 1 else [e.shared_level]
    fits = [lv for lv in allowed if need_mb(cfg, server, lv, profile) <= profile.memory_mb]
    return min(fits) if fits else None


# --------------------------------------------------------------------------- the plan


def build_plan(
    cfg: Config,
    server: ServerModel,
    server_round: int,
    level: float | None = None,
    emulator: EmulatorRef | None = None,
    device_plan: DevicePlan | None = None,
    profile: DeviceProfile | None = None,
    clipping_norm: float = 0.0,
) -> Plan:
    """The plan a device receives: the one place a `Plan` is built.

    `level` None: the profile query's plan (only its data config matters to the device).
    Otherwise the device trains at `level` on `emulator` (None: the full model, case 3), with
    `device_plan`'s rank, batch, bits and modules under the planner. The memory it checks before
    training is the plan's estimated need and, for a simulated device (its `profile` is all it
    has), the profile's budget; case 3 without a planner and fed_ft are the full-model
    baselines, which assume the device holds the model.
    """
    if level is None:
        return Plan(cfg.model, cfg.data, cfg.partition, cfg.adapter, cfg.train, seed=cfg.seed)
    adapter, train, bits, compute_dtype = cfg.adapter, cfg.train, 0, ""
    if device_plan is not None:
        adapter = server.device_adapter(device_plan.rank, device_plan.share)
        train = replace(cfg.train, batch_size=device_plan.batch)
        bits, compute_dtype = device_plan.bits, device_plan.compute_dtype
    need, budget = 0.0, 0.0
    if not (server.full_ft or (cfg.emulator.case == 3 and device_plan is None)):
        need = device_plan.memory_mb if device_plan else server.memory_need_mb(level)
        if not cfg.devices.from_nodes and profile is not None:
            budget = profile.memory_mb
    return Plan(
        cfg.model,
        cfg.data,
        cfg.partition,
        adapter,
        train,
        emulator or EmulatorRef(),
        adapter_layers=server.adapter_layers,
        seed=cfg.seed,
        server_round=server_round,
        bits=bits,
        compute_dtype=compute_dtype,
        full_finetune=server.full_ft,
        need_mb=need,
        budget_mb=budget,
        disk_mb=profile.disk_mb if profile is not None else 0.0,
        clipping_norm=clipping_norm,
        evaluate_first=cfg.strategy.evaluate_received,
    )


def device_work(
    plans: Mapping[int, Plan], sent: Mapping[int, Mapping[str, tuple[int, ...]]], max_length: int
) -> dict[int, tuple[float, float]]:
    """Node -> (adapter bytes each way, tokens trained) of the work each device was sent: the
    adapter it received (its rank, matrices, held layers; float32) travels both ways, and its
    plan's local steps x batch x `max_length` tokens are trained (the cost model's inputs)."""
    return {
        node: (
            4.0 * sum(math.prod(shape) for shape in sent[node].values()),
            float(plan.train.local_steps * plan.train.batch_size * max_length),
        )
        for node, plan in plans.items()
        if node in sent
    }


def put_adapter(
    content: RecordDict,
    cfg: Config,
    server: ServerModel,
    state: Mapping[str, np.ndarray],
    level: float,
    planned: tuple[list[str], int] | None,
    offset: int = 0,
) -> dict[str, np.ndarray] | None:
    """Put into `content` what of the global adapter `state` a device at `level` is sent, and
    return it (None: the whole adapter, already in `content`). A planned device (`planned`: its
    matrices and rank) gets those matrices at its rank (`device_share`) and, `exact` with
    `strategy.residual`, the frozen rest; under `stack`, the block at `offset` to train and the
    stack so far frozen (`stack_share`; offset 0 to evaluate the whole); under
    `emulator.adapt=held` a device gets the layers its emulator holds."""
    share = None
    if planned is not None and cfg.strategy.aggregation == "stack":
        modules, rank = planned
        share, rest = stack_share(dict(state), modules, rank, offset, stack_used(state))
        if rest:
            content[RESIDUAL_KEY] = to_record(rest)
    elif planned is not None:
        exact = cfg.strategy.aggregation == "exact"
        modules, rank = planned
        share = device_share(dict(state), modules, rank, exact, server.initial_state)
        if (
            exact
            and cfg.strategy.residual
            and (rest := device_residual(dict(state), modules, rank))
        ):
            content[RESIDUAL_KEY] = to_record(rest)
    elif server.partial_adapters:
        share = server.device_adapter_state(dict(state), level)
    if share is not None:
        content[ADAPTER_KEY] = to_record(share)
    return share


def stack_blocks(
    state: Mapping[str, np.ndarray], plans: dict[int, DevicePlan | str], server: ServerModel
) -> tuple[dict[str, np.ndarray], dict[int, int], float | None]:
    """`strategy.aggregation=stack`: where in the global adapter (capacity: its rank) each planned
    device's block goes this round (node -> first component), after making room (`stack_room`:
    the stack re-factorised where this round's blocks would not fit; its truncation error is
    returned, None where nothing moved). Devices whose blocks together would exceed the capacity
    (smallest ranks are placed first) sit the round out: their plan becomes the reason."""
    rank, fill = server.adapter_cfg.r, server.initial_state
    ranks = {n: p.rank for n, p in plans.items() if isinstance(p, DevicePlan)}
    placed: dict[int, int] = {}
    need = 0
    for node in sorted(ranks, key=lambda n: (ranks[n], n)):
        if need + ranks[node] <= rank:
            placed[node] = need
            need += ranks[node]
        else:
            plans[node] = f"stack full: the global rank {rank} holds no block of rank {ranks[node]}"
    new, error = stack_room(state, need, rank, fill)
    start = stack_used(new)
    return new, {node: start + at for node, at in placed.items()}, error if error > 0 else None
