"""Crash and resume: a killed server continues from its checkpoint to the uninterrupted result,
and resuming refuses what it cannot continue."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from fedpeat.outputs import read_metrics
from server_app.app import _run
from tests.helpers import final_state

RESUMABLE = (
    "experiment=tiny rounds=4 controller=ppo controller.ppo.checkpoint= "
    "controller.ppo.online_every=2 strategy.fraction_evaluate=0"
)


def test_a_killed_server_resumes_to_the_uninterrupted_result(
    tmp_path, server_identity, device_disks
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    from server_app.checkpoint import open_resume

    # Each run has its own device disks: what devices hold changes what is sent, hence the
    # modelled latency and the controller's reward.
    whole = tmp_path / "whole"
    whole.mkdir()
    os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = str(
        tmp_path / "devices-whole"
    )  # restored by the fixture
    _run(InProcessGrid(3), compose(RESUMABLE), whole)
    os.environ["FEDPEAT_DEVICE_CACHE_DIR"] = str(tmp_path / "devices-killed")

    killed = tmp_path / "killed"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serve_inprocess", str(killed), RESUMABLE, "3"],
        cwd=root,
        env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            marker = killed / "checkpoint.json"
            if marker.is_file() and json.loads(marker.read_text())["round"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the server finished or died before round 2 was checkpointed"
        proc.send_signal(signal.SIGKILL)  # no clean-up, no summary: as a crash
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "summary.json").exists()
    done = json.loads((killed / "checkpoint.json").read_text())["round"]
    assert done in (2, 3)

    cfg = compose(f"{RESUMABLE} resume={killed}")
    run_dir, ckpt = open_resume(cfg, tmp_path)
    assert run_dir == killed and ckpt.round == done
    _run(InProcessGrid(3), cfg, run_dir, None, ckpt)

    rows = read_metrics(killed / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
    want, got = final_state(whole), final_state(killed)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
    # the same controller decisions (node ids are 1000 + partition in-process) and rewards
    ref = read_metrics(whole / "metrics.jsonl")
    assert [r["action"] for r in rows] == [r["action"] for r in ref]
    assert [r["reward"] for r in rows[1:]] == pytest.approx(
        [r["reward"] for r in ref[1:]], rel=1e-6
    )
    np.testing.assert_allclose(
        [r["plugin_ppl"] for r in rows], [r["plugin_ppl"] for r in ref], rtol=1e-5
    )


def test_resume_refuses_what_it_cannot_continue(tmp_path, server_identity, device_disks) -> None:
    from fedpeat.config import ConfigError
    from server_app.checkpoint import open_resume

    with pytest.raises(ConfigError, match="no run directory at"):
        open_resume(compose(f"experiment=tiny resume={tmp_path / 'absent'}"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoint.pt does not exist"):
        open_resume(compose(f"experiment=tiny resume={tmp_path / 'empty'}"), tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _run(
        InProcessGrid(2), compose("experiment=tiny rounds=1 strategy.fraction_evaluate=1"), run_dir
    )
    with pytest.raises(
        ConfigError, match=r"in \['seed', 'strategy.fraction_evaluate'\]; only \['rounds'"
    ):
        open_resume(compose(f"experiment=tiny rounds=2 seed=7 resume={run_dir}"), tmp_path)
    same = "experiment=tiny strategy.fraction_evaluate=1"
    with pytest.raises(ConfigError, match="already finished round 1 of rounds=1"):
        open_resume(compose(f"{same} rounds=1 resume={run_dir}"), tmp_path)
    assert open_resume(compose(f"{same} rounds=2 resume={run_dir}"), tmp_path)[1].round == 1
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        open_resume(compose(f"{same} rounds=2 resume={run_dir}"), tmp_path)
