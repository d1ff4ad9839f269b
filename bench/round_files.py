"""Which project files one steady round runs through (the layout's measure of a readable round).

Traces round 2 of an in-process run (real ServerApp path and ClientApps, no Ray) and counts the
project files whose code runs: `entered` (every file, leaves included, with how often the round
came into it from another file) and `directing` (those that call into another project file: the
path a reader follows). Writes bench/results/round_files.{md,json}.

    python -m bench.round_files
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

from bench.common import machine, write_json, write_md

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpeat", "strategies", "server_app", "client_app")
# The default round's path (the whole system: policy, planner, quantized emulators) on a tiny
# model with the default model's 30 layers (so the default levels keep at most half of them),
# three devices; and the plain path of the tiny experiment the test suite traces.
CASES = {
    "default config, tiny 30-layer model, 3 devices": (
        "model=tiny_llama model.tiny.num_layers=30 data.max_samples=600 rounds=2",
        3,
    ),
    "experiment=tiny, 2 devices": ("experiment=tiny rounds=2", 2),
}


@dataclass
class RoundFiles:
    entered: Counter[str] = field(default_factory=Counter)
    """Project file -> times the round came into it from another file (or from outside)."""
    directing: set[str] = field(default_factory=set)
    """Project files that called into another project file."""

    @property
    def crossings(self) -> int:
        return sum(self.entered.values())


@functools.cache
def _project_file(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(PROJECT)
    except ValueError:
        return None
    return str(rel) if rel.parts[0] in PACKAGES else None


def trace_round(overrides: str, devices: int, run_dir: Path, traced: int = 2) -> RoundFiles:
    """Run `overrides` in process with `devices` devices and trace round `traced` (from its
    configure_train to the end of its row). The ServerApp runtime's identity must be set."""
    from flwr.serverapp import Grid

    from bench.inprocess import InProcessGrid
    from fedpeat.config import compose
    from server_app.app import _run
    from server_app.recorder import RoundRecorder
    from strategies.fedpeat_strategy import FedPEAT

    out = RoundFiles()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or (callee := _project_file(frame.f_code.co_filename)) is None:
            return
        caller, back = None, frame.f_back
        while back is not None and (caller := _project_file(back.f_code.co_filename)) is None:
            back = back.f_back
        if caller != callee:
            out.entered[callee] += 1
            if caller is not None:
                out.directing.add(caller)

    configure, record = FedPEAT.configure_train, RoundRecorder.__call__

    def traced_configure(self, server_round, *args, **kwargs):  # type: ignore[no-untyped-def]
        if server_round == traced:
            sys.setprofile(profile)
        return configure(self, server_round, *args, **kwargs)

    def traced_record(self, server_round, arrays):  # type: ignore[no-untyped-def]
        try:
            return record(self, server_round, arrays)
        finally:
            if server_round == traced:
                sys.setprofile(None)

    FedPEAT.configure_train = traced_configure  # type: ignore[method-assign]
    RoundRecorder.__call__ = traced_record  # type: ignore[method-assign]
    try:
        _run(cast(Grid, InProcessGrid(devices)), compose(overrides), run_dir)
    finally:
        sys.setprofile(None)
        FedPEAT.configure_train = configure  # type: ignore[method-assign]
        RoundRecorder.__call__ = record  # type: ignore[method-assign]
    return out


def main() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # What the ServerApp runtime sets before messages may be built outside it.
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        setattr(TaskIdentity, name, value)
    os.environ.setdefault("FEDPEAT_DEVICE_CACHE_DIR", tempfile.mkdtemp(prefix="fedpeat-devices-"))
    results: dict[str, Any] = {}
    for case, (overrides, devices) in CASES.items():
        with tempfile.TemporaryDirectory() as run_dir:
            t = trace_round(overrides, devices, Path(run_dir))
        results[case] = {
            "overrides": overrides,
            "devices": devices,
            "directing": sorted(t.directing),
            "entered": dict(t.entered.most_common()),
            "crossings": t.crossings,
        }
    lines = [
        "# Files one steady round runs through",
        "",
        "`python -m bench.round_files`: round 2 of an in-process run, traced. *Directing*: files",
        "whose code calls into another project file (the issue's limit: 12). *Entered*: every",
        "project file whose code runs, leaves included. *Crossings*: calls from one file into",
        "another. Deterministic: the same code gives the same figures on any machine.",
        "",
        "| run | directing | entered | crossings |",
        "|---|---|---|---|",
    ]
    for case, r in results.items():
        lines.append(f"| {case} | {len(r['directing'])} | {len(r['entered'])} | {r['crossings']} |")
    for case, r in results.items():
        lines += ["", f"## {case}", "", "| file | directing | entered (times) |", "|---|---|---|"]
        lines += [
            f"| `{f}` | {'yes' if f in r['directing'] else ''} | {n} |"
            for f, n in r["entered"].items()
        ]
    write_md("round_files.md", "\n".join(lines) + f"\n\n{machine()}")
    write_json("round_files.json", {"machine": machine(), **results})


if __name__ == "__main__":
    main()
