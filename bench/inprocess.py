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
    is timed on its own: devices would run in parallel)."""

    def __init__(
        self,
        num_nodes: int,
        node_config: Callable[[int], dict] | None = None,
        fail: Callable[[Message, int], Message | None] | None = None,
        tamper: Callable[[Message, int, Message], Message | None] | None = None,
        partitions: Iterable[int] | None = None,
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

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            injected = self.fail(msg, node) if self.fail else None
            if injected is not None:
                replies.append(injected)
                continue
            began = time.perf_counter()
            reply: Message | None
            try:
                reply = client_app(msg, self.contexts[node])
                if self.tamper is not None:
                    reply = self.tamper(msg, node, reply)
            except Exception as err:  # as Flower's runtime does: an error reply, not a crash
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if reply is None or (timeout is not None and time.perf_counter() - began > timeout):
                continue
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies
