"""What the server accepts from a device: a reply's shape and figures, and its update's norm.

A malformed *successful* reply never raises here (Flower's stock FedAvg would, and take the
ServerApp down): each check returns the reason the reply is refused, which the round records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeat.config import Config
from fedpeat.lora import AdapterStateError, check_adapter_state
from fedpeat.protocol import ADAPTER_KEY, METRICS_KEY
from strategies.aggregation import norm_outliers
from strategies.round_stats import RoundStats, content_bytes, from_record

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Device errors that mean "I do not hold that emulator (any more)": resend it next time.
_CACHE_MISS = ("not in the device cache", "was corrupt")

Update = tuple[dict[str, np.ndarray], float, dict[str, Any]]
"""A usable reply: (adapter state, weight, metrics)."""
Accepted = tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]
"""A reply that passed validation: (message, adapter state, weight, metrics)."""


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful line of a device error: Ray wraps the ClientApp's exception in tracebacks."""
    text = _ANSI.sub("", reason or "unknown error")
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.split()).rstrip("'>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lost_emulator(reason: str) -> bool:
    """The device no longer holds the emulator it was sent (so it must be sent again)."""
    return any(s in reason for s in _CACHE_MISS)


def validate_reply(
    msg: Message, expected: Mapping[str, tuple[int, ...]], max_examples: float = float("inf")
) -> Update | str:
    """(state, weight, metrics) of a usable train reply, or the reason it is rejected.

    `expected`: the adapter tensors' shapes the device was sent (its share of the global one);
    `max_examples`: the most training examples the server knows the device to have (its
    profile's data size): a reply weighted beyond it would steer the average by a claim alone.
    """
    if msg.has_error():
        return f"device error: {short_reason(msg.error.reason or '')}"
    content = msg.content
    if ADAPTER_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        return f"reply lacks '{ADAPTER_KEY}' arrays or '{METRICS_KEY}' metrics"
    metrics = dict(content.metric_records[METRICS_KEY])
    weight, loss = metrics.get("num-examples"), metrics.get("train_loss")
    if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        return f"num-examples must be a positive number, got {weight!r}"
    if weight > max_examples:
        return (
            f"num-examples {weight:g} exceeds the {max_examples:g} training examples the "
            "device reported before the round"
        )
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        return f"train_loss must be a finite number, got {loss!r}"
    try:
        state = from_record(content.array_records[ADAPTER_KEY])
        wrong = [(k, v.dtype) for k, v in state.items() if v.dtype.kind != "f"]
        if wrong:
            return f"invalid adapter: {wrong[0][0]} has dtype {wrong[0][1]}, expected floats"
        check_adapter_state(dict(expected), state)
    except (AdapterStateError, ValueError, TypeError, EOFError, OSError) as err:
        return f"invalid adapter: {type(err).__name__}: {err}"
    return state, float(weight), metrics


def accept_replies(
    stats: RoundStats,
    replies: Iterable[Message],
    expected: Mapping[int, Mapping[str, tuple[int, ...]]],
    shapes: Mapping[str, tuple[int, ...]],
    timeout_s: float,
    max_examples: Mapping[int, float] | None = None,
) -> tuple[list[Accepted], list[tuple[int, str, str]]]:
    """The train replies that pass `validate_reply` (`expected`: node -> the shapes it was sent;
    `shapes` for a node not in it; `max_examples`: node -> the examples it reported having), and
    (node, reason, status) for the others and for the devices sent work that did not answer by
    the deadline. Counts the bytes that came back."""
    valid: list[Accepted] = []
    refused: list[tuple[int, str, str]] = []
    answered = set()
    for msg in replies:
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_content():
            up = content_bytes(msg.content)
            stats.bytes_up += up
            if dev := stats.devices.get(node):
                dev.bytes_up = up
        limit = (max_examples or {}).get(node, float("inf"))
        checked = validate_reply(msg, expected.get(node, shapes), limit)
        if isinstance(checked, str):
            refused.append((node, checked, "rejected"))
        else:
            valid.append((msg, *checked))
    for node in stats.devices.keys() - answered:  # the grid gave up on them at the deadline
        reason = f"no reply within strategy.round_timeout_s={timeout_s:g}"
        refused.append((node, reason, "timeout"))
    # Replies come in the order they arrived, which load changes from run to run; the average
    # adds them in a fixed one (partition, then node: node ids differ between runs, partitions
    # do not), so a run and its resumption sum the same floats in the same order.
    valid.sort(
        key=lambda a: (_partition(stats, a[0].metadata.src_node_id), a[0].metadata.src_node_id)
    )
    return valid, refused


def _partition(stats: RoundStats, node: int) -> int:
    dev = stats.devices.get(node)
    return dev.partition if dev is not None else -1


def screen_norms(
    cfg: Config, norms: Mapping[int, float], trusted: Sequence[float]
) -> dict[int, str]:
    """Node -> reason for updates far above the round's median norm (and, with client-side DP
    clipping, updates the device did not clip). `trusted`: the server's own update norm."""
    pv = cfg.privacy
    # Under DP the median screen is off: whom it rejects depends on the other devices' data,
    # which the noise does not cover; clipping bounds every update instead.
    bound = 0.0 if pv.enabled else cfg.strategy.norm_bound
    bad = norm_outliers(dict(norms), bound, list(trusted))
    if pv.enabled and pv.clipping == "client":
        limit = pv.clipping_norm * (1 + 1e-4)  # float32 rounding of a clipped update
        for node, norm in norms.items():
            if norm > limit and node not in bad:
                bad[node] = (
                    f"update norm {norm:.4g} exceeds privacy.clipping_norm="
                    f"{pv.clipping_norm:g}: the device did not clip it"
                )
    return bad
