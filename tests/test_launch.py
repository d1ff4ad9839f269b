"""The launcher: end to end through `flwr run` (local Ray simulation) on the tiny model, and the
outcome of a resumed run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedpeat.cli.flower import marked_pids
from fedpeat.cli.launch import launch
from tests.helpers import pids_under


def _check_run(outcome, rounds: int) -> list[dict]:
    assert outcome.ok, f"{outcome.status}: {outcome.run_dir}"
    run_dir: Path = outcome.run_dir
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for key in ("round", "plugin_ppl", "train_loss", "num_clients", "bytes_up", "bytes_down"):
        assert all(key in r for r in rows), key
    assert rows[0]["num_clients"] == 0 and rows[0]["train_loss"] is None
    assert all(r["num_clients"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("zero_shot_ppl", "final_plugin_ppl", "rounds", "wall_s"):
        assert key in summary
    assert summary["rounds"] == rounds
    assert summary["zero_shot_ppl"] == rows[0]["plugin_ppl"]
    assert summary["final_plugin_ppl"] == rows[-1]["plugin_ppl"]
    for name in (
        "config.yaml",
        "ppl.png",
        "bytes.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "error.txt").exists()
    return rows


@pytest.fixture(autouse=True)
def device_disks(tmp_path, monkeypatch):
    """Fresh emulator caches for the simulated devices (launched processes inherit it)."""
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices"))


@pytest.mark.slow
def test_tiny_run_under_flwr_run(tmp_path, tiny_cfg) -> None:
    outcome = launch(
        devices=3, overrides="experiment=tiny", output_dir=tmp_path / "runs", stream=False
    )
    rows = _check_run(outcome, rounds=2)
    assert all(r["num_clients"] == 3 for r in rows[1:])
    # FedPEAT case 1: emulators went out in round 1 only, and devices evaluated on them.
    assert (
        rows[1]["exchanges"] == 3 and rows[2]["exchanges"] == 0 and rows[2]["emulator_bytes"] == 0
    )
    assert all(r["received_emulator_ppl"] is not None for r in rows[1:])
    assert all(d["bytes_down"] > 0 and d["bytes_up"] > 0 for d in rows[1]["devices"])
    # SuperLink, SuperExec, the simulation and Ray all carried the launch's marker: none is left.
    assert marked_pids(outcome.marker) == []
    # The tiny model is random, so training on Shakespeare lowers its perplexity quickly.
    assert rows[-1]["plugin_ppl"] < rows[0]["plugin_ppl"]

    # The exported adapter is a standard PEFT adapter that plugs into the base model and
    # reproduces the server's final plug-in perplexity.
    from peft import PeftModel

    from fedpeat.data import encode, server_data
    from fedpeat.model import load_model, load_tokenizer
    from fedpeat.train import evaluate_ppl, resolve_device

    base = load_model(tiny_cfg.model, cached=False)
    model = PeftModel.from_pretrained(base, str(outcome.run_dir / "adapter"))
    tok = load_tokenizer(tiny_cfg.model)
    held = encode(server_data(tiny_cfg.data), tok, tiny_cfg.data.max_length)
    res = evaluate_ppl(
        model, held, tiny_cfg.train.eval_batch_size, tok.pad_token_id, resolve_device("cpu")
    )
    assert res.ppl == pytest.approx(rows[-1]["plugin_ppl"], rel=1e-4)

    from fedpeat.cli.generate import generate

    text = generate(outcome.run_dir, "ROMEO:\n", max_new_tokens=8)
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_a_simulation_joins_a_ray_cluster_and_uses_both_of_its_nodes(tmp_path) -> None:
    """Two raylets on this machine, one CPU each (Ray's own multi-node test cluster): the run
    joins the cluster by its address, and Flower's pool puts a device actor on each node."""
    import ray
    from ray.cluster_utils import Cluster

    # The raylets start here, so their workers inherit the test's caches and offline settings.
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        outcome = launch(
            devices=2,
            overrides="experiment=tiny rounds=1 strategy.fraction_evaluate=0",
            output_dir=tmp_path / "runs",
            stream=False,
            ray_address=cluster.address,
        )
        rows = _check_run(outcome, rounds=1)
        assert rows[1]["num_clients"] == 2
        ray.init(address=cluster.address)
        actors = [
            a
            for a in ray._private.state.actors().values()
            if a["ActorClassName"].endswith("ClientAppActor")
        ]
        nodes = {a["Address"]["NodeID"] for a in actors}
        assert len(nodes) == 2, actors
        assert nodes <= {n["NodeID"] for n in ray.nodes()}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_make_run_takes_the_readme_override_with_spaces(tmp_path) -> None:
    """The README's `make run OVERRIDES="\\"data.prompt_template='Q: {prompt} A: '\\""`: make
    receives OVERRIDES="data.prompt_template='Q: {prompt} A: '" and the value must reach Hydra
    whole (pasted into the recipe's shell line, its quotes closed early: a lexer error). The
    launcher's --check composes and validates exactly what a run would, and starts nothing."""
    project = Path(__file__).resolve().parent.parent
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(120)
        )
    )
    readme_override = "\"data.prompt_template='Q: {prompt} A: '\""
    overrides = (
        f"{readme_override} experiment=tiny data=jsonl data.path={data} "
        "data.prompt_field=q data.response_field=a"
    )
    out = subprocess.run(
        ["make", "-s", "run", f"OVERRIDES={overrides}", "DEVICES=2", "ARGS=--check"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "  prompt_template: 'Q: {prompt} A: '" in out.stdout.splitlines()
    assert f"  path: {data}" in out.stdout.splitlines()
    # The same override pasted into the shell line unquoted, as the Makefile once did, splits
    # at the spaces and Hydra refuses it, naming the problem.
    broken = subprocess.run(
        ["make", "-s", "run", "OVERRIDES=data.prompt_template=Q: {prompt}", "ARGS=--check"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert broken.returncode == 2 and "[fedpeat] error: invalid configuration" in broken.stderr


@pytest.mark.slow
def test_bad_input_fails_before_anything_starts(tmp_path) -> None:
    from fedpeat.config import ConfigError
    from fedpeat.data import DataError

    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="train.lr"):
        launch(devices=2, overrides="experiment=tiny train.lr=abc", output_dir=runs, stream=False)
    with pytest.raises(DataError, match="no such file"):
        launch(
            devices=2, overrides="experiment=tiny data=jsonl data.path=nope.jsonl", output_dir=runs
        )
    with pytest.raises(DataError, match="fewer than the 50 devices"):
        launch(devices=50, overrides="experiment=tiny", output_dir=runs, stream=False)
    assert not runs.exists()


@pytest.mark.slow
def test_partitioning_by_a_missing_column_fails_before_anything_starts(
    tmp_path, gsm8k_path
) -> None:
    from fedpeat.data import DataError

    # GSM8K rows have no `play` column to partition by.
    bad_partition = f"experiment=tiny data=jsonl data.path={gsm8k_path} partition=natural"
    with pytest.raises(DataError, match="partition.by='play' is not a column"):
        launch(devices=2, overrides=bad_partition, output_dir=tmp_path / "runs", stream=False)


def test_a_resumed_run_is_found_in_the_directory_it_continues(tmp_path) -> None:
    import json

    from fedpeat.cli.launch import outcome_of, resumed_dir

    old = tmp_path / "runs" / "20260101-000000-tiny-111"
    old.mkdir(parents=True)
    (old / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert resumed_dir("", tmp_path) is None
    assert resumed_dir("runs/20260101-000000-tiny-111", tmp_path) == old
    # the new Flower run id (222) names no directory: the resumed one is the run's
    out = outcome_of(222, "finished:completed", tmp_path / "runs", "m", old)
    assert out.run_dir == old and out.ok
    assert outcome_of(222, "finished:completed", tmp_path / "runs", "m").run_dir is None


@pytest.mark.slow
def test_a_server_killed_under_flwr_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
) -> None:
    """The ServerApp (inside the simulation process) is killed once round 2 is checkpointed;
    `resume=` under a new `flwr run` finishes the run to the uninterrupted run's adapter."""
    import os
    import signal
    import threading
    import time

    from tests.helpers import final_state

    overrides = "experiment=tiny rounds=3 strategy.fraction_evaluate=0"
    home = (tmp_path / "flwr").resolve()
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices-whole"))
    whole = launch(3, overrides, tmp_path / "whole", stream=False, flwr_home=home)
    assert whole.ok and whole.run_dir is not None

    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices-killed"))
    out: dict = {}
    runner = threading.Thread(
        target=lambda: out.update(
            first=launch(
                3, overrides, tmp_path / "killed", timeout_s=240, stream=False, flwr_home=home
            )
        )
    )
    runner.start()
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        for ckpt in (tmp_path / "killed").glob("*/checkpoint.json"):
            if json.loads(ckpt.read_text())["round"] >= 2:
                killed = ckpt.parent
        time.sleep(0.05)
    assert killed is not None, "the run finished or died before round 2 was checkpointed"
    for pid in pids_under(home, "flwr-simulation"):  # the ServerApp runs in this process
        os.kill(pid, signal.SIGKILL)
    runner.join()
    assert not out["first"].ok and not (killed / "summary.json").exists()

    resumed = launch(
        3, f"{overrides} resume={killed}", tmp_path / "killed", stream=False, flwr_home=home
    )
    assert resumed.ok and resumed.run_dir == killed
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]

    # Node ids differ between flwr runs; partitions and what they were given do not.
    def given(rs: list[dict]) -> list:
        return [sorted((d["partition"], d["level"]) for d in r["devices"]) for r in rs]

    assert given(rows) == given(ref)
    assert [r["plugin_ppl"] for r in rows] == pytest.approx([r["plugin_ppl"] for r in ref])
    want, got = final_state(whole.run_dir), final_state(killed)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7)
