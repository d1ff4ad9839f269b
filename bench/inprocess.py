"""An in-process Grid: runs the real ClientApp for each message, records everything sent.

It lets a test or a benchmark drive the real ServerApp code path (strategy, recorder, outputs)
for a whole run without Ray, and inspect every message that left the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict

from client_app.app import app as client_app


class InProcessGrid:
    """`fail(msg, node)` may answer instead of the device; `tamper(msg, node, reply)` may change
    a device's real reply, raise (the device failed) or return None (the reply is lost).
    `partitions` picks which partition ids exist (default all of `num_nodes`); node ids are
    1000 + partition id either way. A reply that took longer than the `timeout` passed to
    `send_and_receive` is dropped, as Flower's grid stops waiting at its deadline (each message
    is timed on its own: devices would run in parallel). `push_messages` / `pull_messages` serve
    a caller that times each reply (measured links); `delay_s(node)` adds a simulated link's
    seconds to when a reply can be pulled."""

    def __init__(
        self,
        num_nodes: int,
        node_config: Callable[[int], dict] | None = None,
        fail: Callable[[Message, int], Message | None] | None = None,
        tamper: Callable[[Message, int, Message], Message | None] | None = None,
        partitions: Iterable[int] | None = None,
        delay_s: Callable[[int], float] | None = None,
    ) -> None:
        ids = list(range(num_nodes)) if partitions is None else list(partitions)
        self.node_ids = [1000 + i for i in ids]
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **(node_config(i) if node_config else {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for i in ids
        }
        self.sent: list[Message] = []
        self.fail = fail
        self.tamper = tamper
        self.delay_s = delay_s
        self._pending: dict[str, tuple[float, Message]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            reply, elapsed = self._answer(msg)
            if reply is None or (timeout is not None and elapsed > timeout):
                continue
            replies.append(reply)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run each device now; its reply can be pulled once its handler time plus
        `delay_s(node)` (its link, simulated) has passed since the push, as if the devices ran
        in parallel."""
        began = time.monotonic()
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = msg_id = f"m{len(self.sent)}-{i}"
            ids.append(msg_id)
            reply, elapsed = self._answer(msg)
            if reply is not None:
                delay = self.delay_s(msg.metadata.dst_node_id) if self.delay_s else 0.0
                self._pending[msg_id] = (began + elapsed + delay, reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        now, out = time.monotonic(), []
        for msg_id in list(message_ids):
            if msg_id in self._pending and self._pending[msg_id][0] <= now:
                reply = self._pending.pop(msg_id)[1]
                reply.metadata.__dict__["_reply_to_message_id"] = msg_id
                out.append(reply)
        return out

    def _answer(self, msg: Message) -> tuple[Message | None, float]:
        """The device's reply (or the injected one; None: lost) and its handler's seconds."""
        self.sent.append(msg)
        node = msg.metadata.dst_node_id
        injected = self.fail(msg, node) if self.fail else None
        if injected is not None:
            return injected, 0.0
        began = time.perf_counter()
        reply: Message | None
        try:
            reply = client_app(msg, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(msg, node, reply)
        except Exception as err:  # as Flower's runtime does: an error reply, not a crash
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        if reply is not None:
            reply.metadata.__dict__["_src_node_id"] = node
        return reply, time.perf_counter() - began
