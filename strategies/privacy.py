"""Central differential privacy on device updates: Flower's fixed-clipping wrappers around an
equal-weight mean, and a Renyi-DP accountant for the Gaussian mechanism.

The wrappers (`DifferentialPrivacyServerSideFixedClipping`, `...ClientSideFixedClipping`) own
the clipping (server side) and the noise; they wrap `_Mean`, which averages the adapter arrays of
the replies it is given. FedPEAT hands them only replies that passed its own validation, so a
malformed reply never reaches Flower's clipping code (which would raise on it).

The accountant is ours because Flower's requires its FedAvg strategy and the optional
`dp-accounting` package: it composes one Gaussian release per aggregated round, without
sampling amplification (a valid upper bound whatever fraction of devices is sampled).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_stdv,
)

from fedpeat.config import PrivacyConfig
from fedpeat.protocol import ADAPTER_KEY

# Renyi orders searched for the tightest epsilon (as in common RDP accountants).
ORDERS: tuple[float, ...] = (
    *(1.0 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
)


def gaussian_rdp(noise_multiplier: float, releases: int, order: float) -> float:
    """RDP of `releases` Gaussian releases with noise std = noise_multiplier x sensitivity:
    releases x order / (2 sigma^2) (Mironov 2017, Prop. 7, composed additively)."""
    return releases * order / (2.0 * noise_multiplier**2)


def rdp_to_epsilon(rdp: float, order: float, delta: float) -> float:
    """epsilon at `delta` from RDP `rdp` at `order`: rdp + log((a-1)/a) - (log delta + log a)/(a-1)
    (Balle et al. 2020, Thm. 21; the conversion dp-accounting uses), floored at 0."""
    a = order
    return max(rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1), 0.0)


def epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, best order) at `delta` after `releases` Gaussian releases, minimised over
    `ORDERS`. No release: 0; no noise: infinite."""
    if releases == 0:
        return 0.0, math.nan
    if noise_multiplier <= 0:
        return math.inf, math.nan
    return min(
        (rdp_to_epsilon(gaussian_rdp(noise_multiplier, releases, a), a, delta), a) for a in ORDERS
    )


class _Mean(Strategy):
    """The DP wrappers' inner strategy: the global adapter plus the sum of the (clipped) updates
    divided by a fixed, public count: the devices sent work this round (DP-FedAvg's fixed
    denominator). A device that failed, was rejected or sent nothing contributes zero, so adding
    or removing one device changes the result by at most clipping_norm / count, which is what the
    wrappers' noise std (noise_multiplier x clipping_norm / count) is calibrated to."""

    def __init__(self) -> None:
        self.base: dict[str, np.ndarray] = {}
        self.count = 1

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        records = [msg.content.array_records[ADAPTER_KEY] for msg in replies]
        total = {k: np.zeros(v.shape, np.float64) for k, v in self.base.items()}
        for record in records:
            for k, base in self.base.items():
                total[k] += record[k].numpy().astype(np.float64) - base
        mean = {k: (self.base[k] + total[k] / self.count).astype(np.float32) for k in self.base}
        return ArrayRecord({k: Array(v) for k, v in mean.items()}), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


@dataclass
class PrivateMean:
    """The configured wrapper around `_Mean`, and the privacy spent so far."""

    cfg: PrivacyConfig
    releases: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if self.cfg.clipping == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        self.mean = _Mean()
        # num_sampled_clients is set per round to the number of devices sent work.
        self.wrapper = wrapper(self.mean, self.cfg.noise_multiplier, self.cfg.clipping_norm, 1)

    def configure(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> dict[str, float]:
        """Let the wrapper see the round's global adapter (server-side clipping is relative to
        it); returns what the devices must be told (client side: the clipping norm)."""
        config = ConfigRecord()
        self.wrapper.configure_train(server_round, arrays, config, grid)
        self.mean.base = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        norm = config.get(KEY_CLIPPING_NORM)
        return {KEY_CLIPPING_NORM: float(norm)} if isinstance(norm, (int, float)) else {}

    def aggregate(
        self, server_round: int, replies: Sequence[Message], sent: int, population: int
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """Clip (server side), sum the updates over the `sent` devices (fixed denominator) and
        add noise; account the release.

        `replies` are validated ones whose adapter arrays are in the global adapter's key order.
        An update of exactly zero is left out (it adds nothing, and Flower's clipping divides by
        the norm). Returns the noisy adapter and this round's privacy row."""
        count = max(sent, 1)
        self.mean.count = self.wrapper.num_sampled_clients = count
        moved = [m for m in replies if _moved(m, self.mean.base)]
        mean = None
        if moved:
            mean, _ = self.wrapper.aggregate_train(server_round, list(moved))
        if mean is None:  # nothing moved: the release is the adapter itself, noised the same way
            arrays = [v.astype(np.float32) for v in self.mean.base.values()]
            add_gaussian_noise_inplace(
                arrays, compute_stdv(self.cfg.noise_multiplier, self.cfg.clipping_norm, count)
            )
            mean = ArrayRecord({k: Array(v) for k, v in zip(self.mean.base, arrays, strict=True)})
        self.releases += 1  # without noise, epsilon is infinite (reported as None)
        eps, order = epsilon(self.cfg.noise_multiplier, self.releases, self.cfg.target_delta)
        row: dict[str, Any] = {
            "clipping": self.cfg.clipping,
            "clipping_norm": self.cfg.clipping_norm,
            "noise_std": compute_stdv(self.cfg.noise_multiplier, self.cfg.clipping_norm, count),
            "devices": count,
            "updates": len(replies),
            "population": population,
            "releases": self.releases,
            "epsilon": None if math.isinf(eps) else eps,
            "delta": self.cfg.target_delta,
            "order": None if math.isnan(order) else order,
        }
        self.history.append(row)
        return mean, row


def _moved(msg: Message, base: dict[str, np.ndarray]) -> bool:
    record = msg.content.array_records[ADAPTER_KEY]
    return any(np.any(record[k].numpy() != base[k].astype(np.float32)) for k in base)


def private_merge(
    private: PrivateMean,
    server_round: int,
    replies: Sequence[tuple[Message, dict[str, np.ndarray]]],
    sent: int,
    population: int,
    server_update: dict[str, np.ndarray] | None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
    """The new global adapter under DP, and the round's privacy row: the clipped updates of the
    `sent` devices summed and noised (`PrivateMean.aggregate`), then the server's own update
    joins as one more share (post-processing: still private). No device sent work: nothing
    private to release, the server's update alone (None: keep the adapter)."""
    if sent == 0:
        return server_update, None
    keys = list(private.mean.base)
    for msg, state in replies:  # Flower clips tensor lists: use the global order
        msg.content[ADAPTER_KEY] = ArrayRecord(
            {k: Array(np.ascontiguousarray(state[k])) for k in keys}
        )
    record, row = private.aggregate(server_round, [m for m, _ in replies], sent, population)
    device_mean = {k: v.numpy() for k, v in record.items()}
    if server_update is None:
        return device_mean, row
    return {
        key: ((sent * device_mean[key] + server_update[key]) / (sent + 1)).astype(np.float32)
        for key in keys
    }, row
