"""Flower processes and connections: launches sharing a Flower home keep their own connection
entry, and a SuperLink whose port is taken says so."""

from __future__ import annotations

import tomllib

from fedpeat.cli.flower import connection_name, remove_connection, write_connection


def test_each_launch_has_its_own_connection_and_removes_only_it(tmp_path) -> None:
    write_connection(tmp_path, 5001)
    write_connection(tmp_path, 5002)
    conf = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert conf["default"] == connection_name(5002)
    assert conf[connection_name(5001)] == {"address": "127.0.0.1:5001", "insecure": True}
    assert conf[connection_name(5002)]["address"] == "127.0.0.1:5002"
    remove_connection(tmp_path, 5002)
    conf = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert connection_name(5002) not in conf and conf["default"] == connection_name(5001)
    assert conf[connection_name(5001)]["address"] == "127.0.0.1:5001"


def test_a_port_in_use_is_named(tmp_path, monkeypatch) -> None:
    import os
    import socket

    import pytest

    from fedpeat.cli import flower

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    monkeypatch.setattr(flower, "free_port", lambda: port)
    env = {**os.environ, "FLWR_HOME": str(tmp_path)}
    env["PATH"] = f"{flower.flwr_bin('flower-superlink').rsplit('/', 1)[0]}:{env['PATH']}"
    link = flower.SuperLink(tmp_path, env)
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}: address already in use"):
            link.wait_ready(timeout=60)
    finally:
        link.stop()
        taken.close()
