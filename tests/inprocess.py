"""An in-process Grid: runs the real ClientApp for each message, records everything sent.

It lets a test drive the real ServerApp code path (strategy, recorder, outputs) for a whole run
without Ray, and inspect every message that left the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict

from client_app.app import app as client_app


class InProcessGrid:
    def __init__(
        self,
        num_nodes: int,
        node_config: Callable[[int], dict] | None = None,
        fail: Callable[[Message, int], Message | None] | None = None,
    ) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **(node_config(i) if node_config else {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        self.fail = fail

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
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as err:  # as Flower's runtime does: an error reply, not a crash
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies
