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
