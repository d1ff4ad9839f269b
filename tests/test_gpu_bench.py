"""bench/gpu.sh: its arithmetic by hand, and the whole script's CPU dry run (everything but the
CUDA calls; on a GPU machine the same script writes the committed CUDA figures)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.client_memory import process_peak_mb
from bench.ray_gpu import summarise

ROOT = Path(__file__).resolve().parents[1]


def _row(rnd: int, exchange: float, *devices: tuple[int | None, float, str]) -> dict:
    return {
        "round": rnd,
        "timing": {"train_exchange": exchange},
        "devices": [
            {"node": i, "gpu": gpu, "handler_s": s, "status": status, "peak_mem_mb": 100.0 + i}
            for i, (gpu, s, status) in enumerate(devices)
        ],
    }


def test_ray_gpu_summary_by_hand() -> None:
    rows = [
        _row(0, 0.0),  # round 0: evaluation only
        # 3 + 3 + 2 = 8 s of handlers in a 4 s exchange: overlap 2; the failed one not counted.
        _row(1, 4.0, (0, 3.0, "ok"), (0, 3.0, "ok"), (0, 2.0, "ok"), (0, 9.0, "failed")),
    ]
    s = summarise(rows, "cuda")
    assert s["passed"] and s["gpu_indices"] == [0] and not s["misplaced"]
    r1 = s["rounds"][1]
    assert r1["trained"] == 3 and r1["handler_s_sum"] == 8.0 and r1["overlap"] == 2.0
    assert r1["peak_mem_mb_max"] == 102.0
    # One device on the CPU (or silent) where CUDA was asked: misplaced, and the check fails.
    bad = summarise([_row(1, 1.0, (0, 1.0, "ok"), (-1, 1.0, "ok"), (None, 1.0, "ok"))], "cuda")
    assert not bad["passed"] and [m["node"] for m in bad["misplaced"]] == [1, 2]
    # On the CPU every device must say -1.
    assert summarise([_row(1, 1.0, (-1, 1.0, "ok"))], "cpu")["passed"]
    assert not summarise([_row(1, 1.0, (0, 1.0, "ok"))], "cpu")["passed"]
    assert not summarise([_row(0, 0.0)], "cpu")["passed"]  # nobody trained: nothing shown


def test_process_peak_counts_the_load() -> None:
    assert process_peak_mb({"train_peak_mb": 700.0, "load_peak_mb": 800.0}) == 800.0
    assert process_peak_mb({"train_peak_mb": 700.0, "load_peak_mb": 600.0}) == 700.0
    assert process_peak_mb({"train_peak_mb": 700.0}) == 700.0


def test_gpu_script_refuses_an_unknown_argument() -> None:
    out = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), "--fast"], capture_output=True)
    assert out.returncode == 2 and b"--fast" in out.stderr


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_result(tmp_path) -> None:
    env = {**os.environ, "FEDPEAT_BENCH_RESULTS": str(tmp_path)}
    committed = ROOT / "bench/results"

    def listing() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in committed.glob("*")}

    before = listing()
    out = subprocess.run(
        ["bash", str(ROOT / "bench/gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = ["cuda_check", "client_memory_cuda", "server_memory_cuda", "ray_gpu"]
    for name in names:
        assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.json").is_file()
    check = json.loads((tmp_path / "cuda_check.json").read_text())
    assert check["passed"] and check["device"] == "cpu" and check["nf4_layers"] > 0
    ray = json.loads((tmp_path / "ray_gpu.json").read_text())
    assert ray["passed"] and ray["gpu_indices"] == [-1] and ray["devices"] == 2
    client = json.loads((tmp_path / "client_memory_cuda.json").read_text())
    assert set(client["rows"]) == {"fed_ft", "full_lora", "keep0.5-4"}
    assert all(r["device"] == "cpu" for r in client["rows"].values())
    server = json.loads((tmp_path / "server_memory_cuda.json").read_text())
    assert server["rows"]["default"]["device"] == "cpu"
    assert listing() == before  # the committed figures are left as they were measured
