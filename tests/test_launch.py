"""The launcher's Flower connection file: launches sharing a Flower home keep their own entry."""

from __future__ import annotations

import tomllib

from fedpeat.launch import connection_name, remove_connection, write_connection


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
