"""Screening device replies: what a failed device's reason is cut down to."""

from __future__ import annotations


def test_short_reason_keeps_the_clientapp_message() -> None:
    from strategies.screening import short_reason

    header = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:"
    trace = "<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1)\n  File x\n"
    tail = "Exception ClientAppException occurred. Message: "
    ray = header + trace + tail + "partition.by='play' is not a column of the data; have []'>"
    assert short_reason(ray) == "partition.by='play' is not a column of the data; have []"
    assert short_reason("x" * 400).endswith("...") and len(short_reason("x" * 400)) == 300


def test_valid_replies_are_averaged_in_partition_order_whatever_their_arrival() -> None:
    # Float sums depend on their order: a run and its resumption (new node ids, other arrival
    # order) must add the same updates in the same order.
    import numpy as np

    from strategies.round_stats import DeviceRound, RoundStats
    from strategies.screening import accept_replies
    from tests.helpers import device_reply

    shapes = {"w": (2,)}
    stats = RoundStats()
    for node, partition in ((501, 2), (77, 0), (9, 1)):
        stats.devices[node] = DeviceRound(node, partition, 0.4, False, 0)
    metrics = {"num-examples": 4.0, "train_loss": 1.0}
    for arrival in ([501, 77, 9], [9, 501, 77], [77, 9, 501]):
        replies = [device_reply(n, {"w": np.ones(2, np.float32)}, metrics) for n in arrival]
        valid, refused = accept_replies(stats, replies, {}, shapes, 60.0)
        assert [a[0].metadata.src_node_id for a in valid] == [77, 9, 501] and not refused
