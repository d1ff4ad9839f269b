"""Per-device plans for one round under the FedPipe planner: the option menus the allocation
program chooses from, built from the server's cost-model estimates and the device profiles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpeat.allocation import Allocation, Option, allocate, option_value
from fedpeat.config import Config, DeviceProfile
from fedpeat.cost import MiB, compute_s, rate_bps, transmission_s
from fedpeat.task import NODE_LINK, ServerModel


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
    """The device's mean Shannon rate (no fading: the planner plans on the average channel)."""
    return rate_bps(profile.bandwidth_mhz * 1e6, profile.power_dbm, profile.distance_m)


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
    data_sizes: Mapping[int, int],
    emulator_bytes: Mapping[int, float],
) -> dict[int, DevicePlan | str]:
    """Solve the allocation program for the devices in `levels` (node -> keep ratio)."""
    menus = {
        node: options_for(server, level, profiles[node], data_sizes[node], emulator_bytes[node])
        for node, level in levels.items()
    }
    budgets = {node: profiles[node].memory_mb for node in levels}
    allocations: dict[int, Allocation] = allocate(
        menus, budgets, cfg.planner.deadline_s, cfg.planner.upload_mb
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


def profile_of(
    prof: Mapping[str, Any], sim: DeviceProfile, from_nodes: bool = False
) -> tuple[DeviceProfile, list[str]]:
    """The profile the planner and controller use for a node, and the fields taken from the
    `devices=` profile `sim` because the node did not report them (recorded as assumed).

    Memory: a budget the node's config sets (memory-mb) wins, capped by what it detects when
    `from_nodes` (deployment). Without one, a deployed node's detected memory is its budget; a
    simulated node's detection is the shared host's, so the devices= profile gives it instead.
    Link and compute figures: the node's, else the devices= profile's.
    """
    assumed: list[str] = []
    cap = float(prof.get("memory-mb", -1.0))
    detected = float(prof.get("detected-memory-mb", -1.0))
    if cap > 0:
        memory = min(cap, detected) if from_nodes and detected > 0 else cap
    elif from_nodes and detected > 0:
        memory = detected
    else:
        memory = sim.memory_mb
        assumed.append("memory_mb")
    figures: dict[str, float] = {}
    for key, name in NODE_LINK.items():
        if key in prof:
            figures[name] = float(prof[key])
        else:
            figures[name] = float(getattr(sim, name))
            assumed.append(name)
    profile = DeviceProfile(
        name=str(prof.get("profile", sim.name)),
        memory_mb=memory,
        bf16=bool(prof.get("bf16", sim.bf16)),
        **figures,
    )
    return profile, assumed
