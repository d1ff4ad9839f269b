"""The cost model against values worked out by hand: memory, quantized weights, link rates,
transmission and compute time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeat.cost import (
    ModelShape,
    activation_bytes,
    compute_s,
    load_memory_bytes,
    logits_bytes,
    path_loss_db,
    rate_bps,
    training_memory_bytes,
    transmission_s,
    weight_bytes,
)

SHAPE = ModelShape(params=1000, layers=2, hidden=4, heads=2, vocab=10)


QUANT_SHAPE = ModelShape(
    params=1000, layers=2, hidden=4, heads=2, vocab=10, linear_params=800, max_linear=100
)


def test_memory_estimate_by_hand() -> None:
    # activations: 1.2 * 2 layers * (1*2*4) tokens*hidden * (34 + 5*2*2/4 = 39) * 4 bytes / 2
    # = 1.2 * 1248 = 1497.6
    assert activation_bytes(SHAPE, batch=1, seq=2) == pytest.approx(1497.6)
    # logits: 6 * 1 * 2 * 10 * 4 bytes = 480
    assert logits_bytes(SHAPE, batch=1, seq=2) == 480
    # in chunks of one position: 6 * 1 * 10 * 4 = 240; a chunk beyond the batch changes nothing
    assert logits_bytes(SHAPE, batch=1, seq=2, chunk=1) == 240
    assert logits_bytes(SHAPE, batch=1, seq=2, chunk=64) == 480
    assert training_memory_bytes(SHAPE, 100, 1, 2, loss_chunk=1) == pytest.approx(
        7577.6 - 240 + 96 * 2**20
    )
    # weights 1000 * 4 + adapter 100 * 16 + 1497.6 + 480, and the step's 96 MiB residue
    residue = 96 * 2**20
    assert training_memory_bytes(SHAPE, 100, batch=1, seq=2) == pytest.approx(7577.6 + residue)
    # 4-bit frozen weights: 1000 * 0.5 bytes
    assert training_memory_bytes(SHAPE, 100, batch=1, seq=2, bits=4) == pytest.approx(
        4077.6 + residue
    )
    # fp16 activations halve that term
    assert activation_bytes(SHAPE, batch=1, seq=2, act_bytes=2) == pytest.approx(748.8)


def test_load_peak_by_hand() -> None:
    # x 1.1 the larger of: the whole fp16 package (1000 * 2) plus the embedding (10 * 4) at
    # the compute width, or the built model (1000 at the compute width).
    # 32 bits: max(2000 + 40 * 4 = 2160, 4000) = 4000
    assert load_memory_bytes(SHAPE, 32) == pytest.approx(1.1 * 4000)
    # 16 bits: max(2000 + 40 * 2 = 2080, 2000) = 2080
    assert load_memory_bytes(SHAPE, 16) == pytest.approx(1.1 * 2080)
    # A large embedding (100 * 8 = 800) sets the start above the end: 2000 + 3200 > 4000.
    wide = ModelShape(params=1000, layers=2, hidden=8, heads=2, vocab=100)
    assert load_memory_bytes(wide, 32) == pytest.approx(1.1 * 5200)


def test_fewer_layers_need_less_memory() -> None:
    smaller = ModelShape(params=800, layers=1, hidden=4, heads=2, vocab=10)
    assert training_memory_bytes(smaller, 100, 4, 8) < training_memory_bytes(SHAPE, 100, 4, 8)


def test_quantized_weight_bytes_by_hand() -> None:
    # NF4: 800 linear weights * 4.5 bits / 8 = 450; 200 others * 2 bytes = 400; one 100-weight
    # matrix dequantized to bf16 = 200.
    assert weight_bytes(QUANT_SHAPE, 4, compute_bits=16) == 1050
    # int8: 800 * 1 + 400 + 200
    assert weight_bytes(QUANT_SHAPE, 8, compute_bits=16) == 1400
    # 16 and 32 bits: every weight at that width
    assert weight_bytes(QUANT_SHAPE, 16, compute_bits=16) == 2000
    assert weight_bytes(QUANT_SHAPE, 32) == 4000


def test_training_memory_uses_the_compute_width_for_the_unquantized_rest() -> None:
    # weights 1050 + adapter 100 * 16 + activations (1497.6 at 4 bytes -> 748.8 at 2) + logits
    assert training_memory_bytes(
        QUANT_SHAPE, 100, 1, 2, bits=4, act_bytes=2, compute_bits=16
    ) == pytest.approx(1050 + 1600 + 748.8 + 480 + 96 * 2**20)
    # int8 keeps 2 more bytes per linear weight (a second layout and scratch): 800 * 2.
    assert training_memory_bytes(
        QUANT_SHAPE, 100, 1, 2, bits=8, act_bytes=2, compute_bits=16
    ) == pytest.approx(1400 + 1600 + 1600 + 748.8 + 480 + 96 * 2**20)


def test_shannon_rate_by_hand() -> None:
    # 100 m: path loss 128.1 + 37.6 * log10(0.1) = 90.5 dB. SNR in dB: p - PL - N0 B
    # = 23 - 90.5 - (-174 + 10 log10(1e6) = -114) = 46.5 dB.
    assert path_loss_db(100.0) == pytest.approx(90.5)
    assert rate_bps(1e6, 23.0, 100.0) == pytest.approx(1e6 * math.log2(1 + 10**4.65))
    # 3 dB more fading gain doubles the SNR
    assert rate_bps(1e6, 23.0, 100.0, fading=2.0) == pytest.approx(
        1e6 * math.log2(1 + 2 * 10**4.65)
    )


def test_transmission_and_compute_time_by_hand() -> None:
    # 1e6 bytes down at 8 Mbit/s = 1 s; 5e5 bytes up at 4 Mbit/s = 1 s
    assert transmission_s(1e6, 5e5, 8e6, 4e6) == pytest.approx(2.0)
    # 1000 tokens * 4 * 1e6 params / 1 GFLOP/s = 4 s; full fine-tuning 6N
    assert compute_s(1000, 1_000_000, 1e9) == pytest.approx(4.0)
    assert compute_s(1000, 1_000_000, 1e9, full_finetune=True) == pytest.approx(6.0)


def test_server_compute_by_hand() -> None:
    from fedpeat.cost import server_compute_s

    # (4 * 1000 training tokens + 2 * 500 evaluated) * 1e6 params / 1 GFLOP/s = 5 s
    assert server_compute_s(1000, 500, 1_000_000, 1e9) == pytest.approx(5.0)
    assert server_compute_s(0, 0, 1_000_000, 1e9) == 0.0


def test_a_round_without_devices_costs_the_servers_time() -> None:
    from fedpeat.config import DeviceProfile
    from fedpeat.cost import Level, Weights, price_round

    w = Weights(1.0, 0.01, 0.5, 2.0, 1.0, 0.25)
    level = Level(0.5, 0.5, 1e6, 1_000_000, 100.0)
    prof = DeviceProfile(memory_mb=1000, gflops=1.0)
    out = price_round([0], [prof], [level], np.ones(1), [[]], [0], 0, w, 0.0, 0.0, server_s=7.0)
    assert out.trained == [] and out.latency_s == pytest.approx(7.0)
    # With a device: its compute (1000 tokens * 4 * 1e6 / 1e9 = 4 s) plus the download, then 7 s.
    out = price_round([1], [prof], [level], np.ones(1), [[1]], [0], 0, w, 0.0, 1000.0, server_s=7.0)
    assert out.latency_s == pytest.approx(4.0 + 7.0)


def test_each_device_is_priced_by_its_own_plan() -> None:
    from fedpeat.config import DeviceProfile
    from fedpeat.cost import Level, Weights, price_round

    w = Weights(1.0, 0.01, 0.5, 2.0, 1.0, 0.25)
    level = Level(0.5, 0.5, 1e6, 1_000_000, 100.0)
    prof = DeviceProfile(memory_mb=1000, gflops=1.0)
    # Both hold the level already. Tokens 1000 and 2000: 4 s and 8 s of compute (4 * 1e6 / 1e9
    # per token); no adapter bytes, so no transmission.
    out = price_round(
        [1, 1], [prof, prof], [level], np.ones(2), [[1], [1]], [0, 0], 0, w, [0.0, 0.0], [1e3, 2e3]
    )
    assert out.device_latency_s == {0: pytest.approx(4.0), 1: pytest.approx(8.0)}
    assert out.latency_s == pytest.approx(8.0)
    # 1e5 adapter bytes each way for the second device only: 2 * 8e5 bits at the profile's rate.
    rate = rate_bps(prof.bandwidth_mhz * 1e6, prof.power_dbm, prof.distance_m, 1.0)
    out = price_round(
        [1, 1], [prof, prof], [level], np.ones(2), [[1], [1]], [0, 0], 0, w, [0.0, 1e5], [1e3, 1e3]
    )
    assert out.device_latency_s[0] == pytest.approx(4.0)
    assert out.device_latency_s[1] == pytest.approx(4.0 + 1.6e6 / rate)
    # One figure for every device is the same as repeating it.
    same = price_round(
        [1, 1], [prof, prof], [level], np.ones(2), [[1], [1]], [0, 0], 0, w, 1e5, 1e3
    )
    assert same.device_latency_s[1] == out.device_latency_s[1]
