"""Measured links: the server times each node's exchanges and derives its effective throughput.

A train exchange takes (round trip) = (download + upload) + (the device's own handler time);
the node reports the latter (`handler_s`), so bytes moved / (round trip - handler) is what its
link delivered, queueing and polling included (an *effective* rate, the one a round's time
depends on). Flower's `send_and_receive` returns the replies together, so `TimedGrid` pushes
and pulls itself to see when each reply arrived. A node's figure is the last `window`
exchanges' bytes over their seconds; the cost model uses it instead of the Shannon rate of its
configured link figures (`DeviceProfile.link_bps`).

In simulation every "exchange" is a queue for a Ray worker, not a link: measuring is for
deployment (`devices.measure_links=auto`: on exactly when `devices.from_nodes`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from flwr.app import Message

from fedpeat.config import DeviceProfile
from fedpeat.protocol import METRICS_KEY
from strategies.round_stats import DeviceRound

MIN_EXCHANGE_S = 0.05
"""Below this many seconds of transfer a timing says nothing about the link (clock, polling)."""


class LinkMeter:
    """Per node, the last `window` exchanges as (bytes, seconds)."""

    def __init__(self, window: int = 3) -> None:
        self.window = window
        self._samples: dict[int, deque[tuple[float, float]]] = {}

    def add(self, node: int, nbytes: float, round_trip_s: float, handler_s: float) -> bool:
        """Record one exchange of `nbytes` (both ways) that took `round_trip_s` at the server,
        `handler_s` of it inside the device's handler. False (not recorded) when the transfer
        part is too short to mean anything or a figure is not finite."""
        seconds = round_trip_s - handler_s
        if not (nbytes > 0 and seconds >= MIN_EXCHANGE_S and seconds < float("inf")):
            return False
        self._samples.setdefault(node, deque(maxlen=self.window)).append((nbytes, seconds))
        return True

    def bps(self, node: int) -> float:
        """Effective throughput in bit/s over the node's recorded exchanges; 0: none yet."""
        samples = self._samples.get(node)
        if not samples:
            return 0.0
        return 8.0 * sum(b for b, _ in samples) / sum(s for _, s in samples)

    def renumber(self, mapping: dict[int, int]) -> None:
        self._samples = {mapping.get(n, n): v for n, v in self._samples.items()}


class TimedGrid:
    """A Flower `Grid` whose `send_and_receive` notes when each reply arrived: `round_trip_s`
    maps node -> seconds from the push to its reply, for the last call. Everything else is the
    wrapped grid's. `clock` and `sleep` are injectable for tests."""

    def __init__(
        self,
        grid: Any,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._grid, self.poll_s, self._clock, self._sleep = grid, poll_s, clock, sleep
        self.round_trip_s: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """As Flower's (push, then pull until every reply is in or `timeout` passes), polling
        every `poll_s` so that each reply's arrival is known to that resolution."""
        began = self._clock()
        pending = set(self._grid.push_messages(messages))
        self.round_trip_s = {}
        replies: list[Message] = []
        while pending:
            for reply in self._grid.pull_messages(pending):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
                self.round_trip_s[reply.metadata.src_node_id] = self._clock() - began
            if not pending or (timeout is not None and self._clock() - began >= timeout):
                break
            self._sleep(self.poll_s)
        return replies


def record_exchanges(
    meter: LinkMeter,
    round_trip_s: Mapping[int, float],
    replies: Iterable[Message],
    devices: Mapping[int, DeviceRound],
) -> None:
    """Add each timed reply's exchange (its row's bytes both ways, its handler seconds) to
    `meter` and note the round trip and the node's throughput so far in its row."""
    for msg in replies:
        node = msg.metadata.src_node_id
        dev = devices.get(node)
        if dev is None or node not in round_trip_s or msg.has_error():
            continue
        metrics = msg.content.metric_records.get(METRICS_KEY)
        raw = metrics.get("handler_s", 0.0) if metrics is not None else 0.0
        handler = float(raw) if isinstance(raw, int | float) else 0.0
        dev.round_trip_s = round_trip_s[node]
        meter.add(node, dev.bytes_down + dev.bytes_up, dev.round_trip_s, handler)
        dev.link_bps = meter.bps(node) or None


class MeasuredLinks:
    """The strategy's side: wraps its grid when measuring (`on`) and, after each train
    exchange, records what each reply's timing says."""

    def __init__(self, on: bool, window: int = 3) -> None:
        self.on, self.meter = on, LinkMeter(window)
        self.timed: TimedGrid | None = None

    def wrap(self, grid: Any) -> Any:
        """The grid to run the rounds on: a `TimedGrid` around `grid` when measuring."""
        if self.on:
            self.timed = TimedGrid(grid)
            return self.timed
        return grid

    def record(
        self,
        replies: Iterable[Message],
        devices: Mapping[int, DeviceRound],
        profiles: dict[int, DeviceProfile],
    ) -> dict[int, float]:
        """Record the last exchange's replies (`record_exchanges`), set each measured node's
        `link_bps` in `profiles` (the planner's) and return node -> bit/s for the measured."""
        if self.timed is None:
            return {}
        record_exchanges(self.meter, self.timed.round_trip_s, replies, devices)
        links = {n: bps for n in profiles if (bps := self.meter.bps(n)) > 0}
        for node, bps in links.items():
            profiles[node] = replace(profiles[node], link_bps=bps)
        return links
