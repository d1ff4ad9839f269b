"""Cost model: pure functions of model shape and plan, units in their names and docstrings.

Memory of one local LoRA training step (the level chooser and the planner use it):

  frozen weights      n_linear * bits_eff / 8 + (n_frozen - n_linear) * compute bytes
                      (bitsandbytes quantizes the decoder's linear layers only; NF4 stores one
                      fp32 absmax per 64 weights, so 4-bit costs 4.5 bits; below the compute
                      width the largest matrix is also dequantized once per forward)
  int8 backward       + n_linear bytes at 8 bits (bitsandbytes keeps a second int8 layout of
                      each weight for the backward on CPU)
  adapter             n_adapter * 4 bytes * 4   (fp32 weights, grads, Adam m and v)
  activations         1.2 * layers * b * s * h * (34 + 5 * a * s / h) * act_bytes / 2
                      (Korthikanti et al. 2022, per transformer layer, which counts 16-bit
                      activations; we scale by act_bytes / 2 for the compute dtype, and by 1.2
                      for what PyTorch's eager autograd keeps beyond it)
  logits              6 * b * s * vocab * 4 bytes  (fp32: the logits, the loss's log-softmax,
                      their gradients and the copies around the cross-entropy alive at once)
  runtime             a fixed allowance for the framework (weights of other processes are not
                      counted; it is a per-process figure)

Loading comes before training (`load_memory_bytes`): the model is filled from the wire package
(fp16) tensor by tensor, each package tensor freed once copied, so the peak is the larger of
the package plus the first (embedding) tensor at the compute width, and the built model (x 1.1);
quantization comes after, replacing one weight at a time, and stays below it.

The factors (1.2, 6 copies, the int8 layout, 1.1 on load) are calibrated on measured peaks of
the default model, every level at 32, 8 and 4 bits (`python -m bench.client_memory`,
`bench/results/client_memory.md`: measured / estimate within 0.9-1.1 for training and load).

With LoRA the backward pass runs through every layer above the lowest adapter, so all layers'
activations are kept: activations scale with the emulator's depth.

Time of one round on a device (the planner's deadline; the controller's latency):

  rate          B log2(1 + p g / (N0 B)), g = 10^(-(128.1 + 37.6 log10 d_km) / 10) * |h|^2,
                N0 = -174 dBm/Hz (|h|^2 = 1 without fading)
  transmission  (emulator bytes if sent + adapter bytes down) / rate + adapter bytes up / rate
  compute       tokens * 4 * N_emulator / FLOP/s   (LoRA: forward 2N, backward through frozen 2N)

A round (`price_round`, shared by the controller's environment and the federated strategy): the
max over the devices sent work of transmission + compute, plus the server's own compute (its
training step at 4N and its evaluations at 2N per token, on devices.server_gflops), the
emulator swaps it causes, and its reward
-(w_ppl * ppl / ppl_0 + w_latency * latency_s + w_swaps * swaps) - penalties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from fedpeat.config import Config, DeviceProfile

MiB = 2**20
T = TypeVar("T")


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a (possibly layer-dropped) model."""

    params: int
    """All parameters (embedding counted once when tied)."""
    layers: int
    hidden: int
    heads: int
    vocab: int
    linear_params: int = 0
    """Weights of the decoder layers' linear projections: what bitsandbytes quantizes."""
    max_linear: int = 0
    """Elements of the largest such matrix (dequantized transiently in a quantized forward)."""


ACTIVATION_FACTOR = 1.2
"""Measured stored activations over Korthikanti et al.'s count (eager PyTorch autograd)."""
INT8_EXTRA_BYTES = 2
"""Bytes per int8 linear weight beyond the weight itself in a training step: bitsandbytes'
transposed layout for the backward and its outlier scratch (measured: 1 B left the 8-bit rows
13-19% under their peaks)."""
STEP_RESIDUE_BYTES = 96 * 2**20
"""What a training step leaves resident beyond its tensors, whatever the model's size: memory
the allocator keeps after the step's temporaries are freed (measured, bench.client_memory:
95-110 MB at every emulator level and width on CPU once the chunked loss took the logits away)."""
LOGITS_COPIES = 6
"""b x s x vocab fp32 tensors alive at once around the loss (measured)."""


def activation_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: int = 4) -> float:
    """Stored activations of one training step, all layers, in bytes."""
    per_layer = batch * seq * shape.hidden * (34 + 5 * shape.heads * seq / shape.hidden)
    return ACTIVATION_FACTOR * shape.layers * per_layer * act_bytes / 2


def logits_bytes(shape: ModelShape, batch: int, seq: int, chunk: int = 0) -> float:
    """fp32 logits, the loss's log-softmax, their gradients and the copies between them, for
    every position, or for `chunk` positions at a time (`train.loss_chunk`)."""
    rows = batch * seq if chunk <= 0 else min(batch * seq, chunk)
    return float(LOGITS_COPIES * rows * shape.vocab * 4)


NF4_BITS = 4.5  # 4 bits + one fp32 absmax per 64-weight block


def weight_bytes(shape: ModelShape, bits: int, compute_bits: int = 32) -> float:
    """Frozen weights when the linear projections are stored at `bits` and the rest (embeddings,
    norms) at `compute_bits`; equal widths give params * bits / 8."""
    if bits >= compute_bits:
        return shape.params * bits / 8
    stored = NF4_BITS if bits == 4 else bits
    rest = shape.params - shape.linear_params
    transient = shape.max_linear * compute_bits / 8
    return shape.linear_params * stored / 8 + rest * compute_bits / 8 + transient


def training_memory_bytes(
    shape: ModelShape,
    adapter_params: int,
    batch: int,
    seq: int,
    bits: int = 32,
    act_bytes: int = 4,
    runtime_bytes: float = 0.0,
    compute_bits: int | None = None,
    loss_chunk: int = 0,
) -> float:
    """Estimated peak bytes of one LoRA training step (see the module docstring).

    `compute_bits` is the width of the unquantized weights (default `bits`: every weight at
    `bits`, the plain fp32 / bf16 model); `loss_chunk` the positions whose logits exist at once
    (0: all)."""
    compute = bits if compute_bits is None else compute_bits
    weights = weight_bytes(shape, bits, compute)
    if bits == 8 and compute > 8:  # int8's second layout for the backward, and its scratch
        weights += INT8_EXTRA_BYTES * shape.linear_params
    adapter = adapter_params * 4 * 4
    return (
        weights
        + adapter
        + activation_bytes(shape, batch, seq, act_bytes)
        + logits_bytes(shape, batch, seq, loss_chunk)
        + STEP_RESIDUE_BYTES
        + runtime_bytes
    )


LOAD_FACTOR = 1.1
"""Measured load peak over the package and the model it builds (allocator slack)."""


def load_memory_bytes(shape: ModelShape, compute_bits: int = 32) -> float:
    """Peak bytes while a device loads an emulator from its fp16 wire package, consumed as the
    model is filled: at the start the whole package and the embedding's copy at the compute
    width, at the end the built model (quantization, one weight at a time, stays below)."""
    width = compute_bits / 8
    start = shape.params * 2 + shape.vocab * shape.hidden * width
    return LOAD_FACTOR * max(start, shape.params * width)


def choose_level(
    levels: list[float], need_bytes: dict[float, float], budget_bytes: float
) -> float | None:
    """The highest keep ratio whose estimated need fits the budget, or None if none fits."""
    fitting = [lv for lv in levels if need_bytes[lv] <= budget_bytes]
    return max(fitting) if fitting else None


# --------------------------------------------------------------------------- time

N0_DBM_PER_HZ = -174.0


def dbm_to_watt(dbm: float) -> float:
    return float(10 ** ((dbm - 30.0) / 10.0))


def path_loss_db(distance_m: float) -> float:
    """Urban macro-cell path loss 128.1 + 37.6 log10(d in km), in dB."""
    return 128.1 + 37.6 * math.log10(distance_m / 1000.0)


def rate_bps(
    bandwidth_hz: float, power_dbm: float, distance_m: float, fading: float = 1.0
) -> float:
    """Shannon rate of the device's link in bit/s; `fading` is the Rayleigh |h|^2 draw."""
    gain = 10 ** (-path_loss_db(distance_m) / 10.0) * fading
    noise = dbm_to_watt(N0_DBM_PER_HZ) * bandwidth_hz
    return bandwidth_hz * math.log2(1.0 + dbm_to_watt(power_dbm) * gain / noise)


def transmission_s(bytes_down: float, bytes_up: float, rate_down: float, rate_up: float) -> float:
    """Seconds to receive `bytes_down` and send `bytes_up` at the given rates (bit/s)."""
    return 8.0 * bytes_down / rate_down + 8.0 * bytes_up / rate_up


def compute_s(tokens: float, params: int, flops: float, full_finetune: bool = False) -> float:
    """Seconds of local training: tokens * (4N for LoRA, 6N for full fine-tuning) / FLOP/s."""
    return tokens * (6 if full_finetune else 4) * params / flops


def server_compute_s(train_tokens: float, eval_tokens: float, params: int, flops: float) -> float:
    """Seconds of the server's own work in a round on the full model of `params` parameters:
    its LoRA training step (4N per token) and its evaluations (forward only, 2N per token)."""
    return (4.0 * train_tokens + 2.0 * eval_tokens) * params / flops


def server_seconds(cfg: Config, params: int) -> float:
    """The server's modelled compute per round for `cfg`: its training step (when it trains)
    and its evaluations of the plug-in model (and of an emulator, for the gap) on validation."""
    d, t = cfg.data, cfg.train
    train_tokens = t.local_steps * t.batch_size * d.max_length if cfg.strategy.server_train else 0
    evals = 2 if cfg.eval.emulator_gap and cfg.emulator.case != 3 else 1
    eval_tokens = evals * d.server_eval_samples * d.max_length
    return server_compute_s(train_tokens, eval_tokens, params, cfg.devices.server_gflops * 1e9)


# --------------------------------------------------------------------------- a round


@dataclass(frozen=True)
class Level:
    """An emulator the server can hand out."""

    keep: float
    fidelity: float
    """ppl_full / ppl_emulator: how much of a step on it carries over to the full model."""
    bytes: float
    params: int
    need_mb: float


@dataclass(frozen=True)
class Weights:
    """Reward weights and penalties (conf/controller/common.yaml)."""

    ppl: float
    latency: float
    swaps: float
    memory_penalty: float
    swap_penalty: float
    swap_share: float


def channel_gain_db(distance_m: float, fading: float) -> float:
    """Large-scale path loss plus Rayleigh fading |h|^2, as a gain in dB (negative)."""
    return -path_loss_db(distance_m) + 10.0 * math.log10(max(fading, 1e-12))


def gains_db(profiles: Sequence[DeviceProfile], fading: np.ndarray) -> np.ndarray:
    """(N,) channel gain of every device for this round's fading draws."""
    return np.array(
        [channel_gain_db(p.distance_m, f) for p, f in zip(profiles, fading, strict=True)]
    )


def device_latency_s(
    profile: DeviceProfile,
    fading: float,
    level: Level,
    send_emulator: bool,
    adapter_bytes: float,
    tokens: float,
    full_finetune: bool = False,
) -> float:
    """One device's round: receive (emulator if it lacks it) + adapter, train, send the adapter.
    Uplink and downlink use the same link figures, or its measured throughput where there is one
    (then no fading draw: the measurement already saw the channel). `full_finetune`: 6N compute
    (fed_ft)."""
    rate = profile.link_bps or rate_bps(
        profile.bandwidth_mhz * 1e6, profile.power_dbm, profile.distance_m, fading
    )
    down = adapter_bytes + (level.bytes if send_emulator else 0.0)
    return transmission_s(down, adapter_bytes, rate, rate) + compute_s(
        tokens, level.params, profile.gflops * 1e9, full_finetune
    )


def _per_device(value: float | Sequence[float], i: int) -> float:
    return float(value) if isinstance(value, int | float) else float(value[i])


def reward(
    ppl: float,
    ppl0: float,
    latency_s: float,
    swaps: int,
    memory_violations: int,
    swap_violations: int,
    w: Weights,
) -> float:
    """The round's reward (module docstring)."""
    return -(w.ppl * ppl / ppl0 + w.latency * latency_s + w.swaps * swaps) - (
        w.memory_penalty * memory_violations + w.swap_penalty * swap_violations
    )


@dataclass
class RoundOutcome:
    """What one round cost, per the model; shared by the environment and the strategy."""

    latency_s: float = 0.0
    swaps: int = 0
    exchanges: int = 0
    memory_violations: int = 0
    swap_violations: int = 0
    trained: list[int] = field(default_factory=list)
    """Indices of devices that trained (took part and fit)."""
    device_latency_s: dict[int, float] = field(default_factory=dict)
    server_s: float = 0.0
    """The server's own compute, after the devices' replies (so a round without devices is
    not free)."""


def cache_keep(held: Sequence[T], sizes: Sequence[float], budget: float) -> list[T]:
    """What a device's emulator cache keeps: `held` oldest use first (the newest, last, is the
    one in use and always stays), the most recently used others while their `sizes` together
    fit `budget` (same unit); an older one is dropped even where a still older one would fit,
    so the cache is exactly the recent past (LRU). `budget` <= 0: the newest alone."""
    if not held:
        return []
    kept, total = [held[-1]], float(sizes[-1])
    for item, size in zip(reversed(held[:-1]), reversed(sizes[:-1]), strict=True):
        if budget <= 0 or total + size > budget:
            break
        kept.append(item)
        total += size
    return kept[::-1]


def price_round(
    action: Sequence[int],
    profiles: Sequence[DeviceProfile],
    levels: Sequence[Level],
    fading: np.ndarray,
    holding: list[list[int]],
    swap_counts: list[int],
    round_index: int,
    w: Weights,
    adapter_bytes: float | Sequence[float],
    tokens: float | Sequence[float],
    check_memory: bool = True,
    full_finetune: bool = False,
    server_s: float = 0.0,
) -> RoundOutcome:
    """Apply `action` (0 skip, k level k-1) to the holdings and swap counts (updated in place)
    and price the round. A device given a level that does not fit its memory does not train and
    receives nothing (the server would not send it). `holding[i]`: the options (level + 1)
    device i holds, oldest use first; it keeps what `cache_keep` allows under its profile's
    `disk_mb`. A level it holds is not sent again; a swap is a download to a device that
    already holds an emulator (a first download is an exchange but no swap).
    `check_memory=False`: the caller has already kept devices that do not fit out of `action`
    (the strategy, whose planner may fit a level by quantizing). `server_s`: the server's own
    compute, added to the slowest device's time. `adapter_bytes` (each way) and `tokens` (trained
    this round) are one figure for every device or one per device (its own plan: rank, modules,
    batch)."""
    out = RoundOutcome(server_s=server_s)
    for i, a in enumerate(action):
        if a == 0:
            continue
        level = levels[a - 1]
        if check_memory and level.need_mb > profiles[i].memory_mb:
            out.memory_violations += 1
            continue
        held = holding[i]
        send = a not in held
        if send:
            out.exchanges += 1
            if held:
                out.swaps += 1
                swap_counts[i] += 1
                if swap_counts[i] > w.swap_share * (round_index + 1):
                    out.swap_violations += 1
        order = [h for h in held if h != a] + [a]
        sizes = [levels[h - 1].bytes for h in order]
        held[:] = cache_keep(order, sizes, profiles[i].disk_mb * MiB)
        t = device_latency_s(
            profiles[i],
            float(fading[i]),
            level,
            send,
            _per_device(adapter_bytes, i),
            _per_device(tokens, i),
            full_finetune,
        )
        out.device_latency_s[i] = t
        out.trained.append(i)
    out.latency_s = max(out.device_latency_s.values(), default=0.0) + server_s
    return out
