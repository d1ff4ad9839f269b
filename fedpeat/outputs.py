"""Run directory: resolved config, per-round metrics (JSONL), summary, plots, adapter.

Layout of `runs/<run-id>/`:
  config.yaml      the resolved configuration
  metrics.jsonl    one JSON object per round, round 0 (the base model) first
  summary.json     written last, only when the run completed
  ppl.png, bytes.png
  adapter/         PEFT adapter (PeftModel.from_pretrained(base, this))
  error.txt        only when the run failed
`runs/latest` points at the newest run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def new_run_dir(output_dir: Path, name: str, run_id: int | str) -> Path:
    """Create `output_dir/<timestamp>-<name>-<run_id>` and point `output_dir/latest` at it."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    run_dir = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=False)
    link = output_dir / "latest"
    tmp = output_dir / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)  # relative, so the tree can be moved
    tmp.replace(link)
    return run_dir


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class MetricsLog:
    """Append-only metrics.jsonl: each row is flushed so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        self.rows.append(clean)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Continue from `rows` (a resumed run): the file is rewritten to exactly them, dropping
        any row of a round the checkpoint does not cover."""
        self.rows = [dict(r) for r in rows]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        tmp.replace(self.path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """ppl.png (plug-in and, if present, device perplexity, on a log scale) and bytes.png (MB
    down/up per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ppl = [
        float(r["plugin_ppl"]) if r.get("plugin_ppl") is not None else float("nan") for r in rows
    ]
    ax.plot(rounds, ppl, "o-", label="plug-in (server held-out)")
    dev = [(r["round"], r["emulator_ppl"]) for r in rows if r.get("emulator_ppl") is not None]
    # Measured before training: round r's figure is round r - 1's adapter.
    dev = dev or [
        (r["round"] - 1, r["received_emulator_ppl"])
        for r in rows
        if r.get("received_emulator_ppl") is not None
    ]
    if dev:
        ax.plot(*zip(*dev, strict=True), "s--", label="emulator (devices' held-out)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Log scale: emulator perplexities run to thousands, and on a linear axis they flatten the
    # plug-in curve the run is about.
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Perplexity per round (round 0 = base model)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "ppl.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.4
    down = [r.get("bytes_down", 0) / 2**20 for r in rows]
    up = [r.get("bytes_up", 0) / 2**20 for r in rows]
    ax.bar([x - width / 2 for x in rounds], down, width, label="down (server to devices)")
    ax.bar([x + width / 2 for x in rounds], up, width, label="up (devices to server)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("MiB")
    ax.set_title("Bytes on the wire per round")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "bytes.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def time_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Modelled seconds until the plug-in perplexity first reaches `target`: the sum of the
    rounds' `latency_s` up to and including that round (0 if the base model already does);
    None if it never does."""
    elapsed = 0.0
    for row in rows:
        elapsed += float(row.get("latency_s") or 0.0)
        if row["plugin_ppl"] <= target:
            return elapsed
    return None
