"""Perplexity-retention curve: how much each emulator level keeps of the full model.

For every level in `emulator.levels`, undistilled and (with `--distill`, or when the config
distils, as the default does) distilled: emulator perplexity on the server's validation split,
its size on the wire in bytes, and its parameter count, next to the full model's.
Writes `<out>/retention.json` and `<out>/retention.png`.

    python -m fedpeat.cli.retention --out runs/retention                 # default model and data
    python -m fedpeat.cli.retention --distill --overrides "emulator.distill.steps=200"
    python -m fedpeat.cli.retention --yaml     # also the curve for conf/controller/common.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedpeat.config import ConfigError, compose
from fedpeat.emulator import package
from fedpeat.model import shape_of
from fedpeat.server_model import ServerModel
from fedpeat.train import evaluate_ppl


def retention_curve(overrides: str = "", distill: bool = False) -> dict[str, Any]:
    """Measure every level without (and optionally with) distillation."""
    cfg = compose(overrides)
    rows: list[dict[str, Any]] = []
    server = ServerModel(cfg)
    full = evaluate_ppl(
        server.base, server.held_out, cfg.train.eval_batch_size, server.pad_id, server.device
    )
    wire = getattr(torch, cfg.emulator.wire_dtype)
    full_bytes = sum(p.numel() for p in server.base.parameters()) * torch.finfo(wire).bits // 8
    rows.append(
        {
            "level": 1.0,
            "distilled": False,
            "ppl": full.ppl,
            "params": shape_of(server.base).params,
            "bytes": full_bytes,
            "full_model": True,
        }
    )
    configured = cfg.emulator.distill.enabled  # the default emulators are distilled
    variants = [False, True] if distill or configured else [False]
    for distilled in variants:
        cfg.emulator.distill.enabled = distilled
        server.emulators.clear()
        for level in sorted(cfg.emulator.levels, reverse=True):
            start = time.perf_counter()
            emulator = server.emulator(level)
            result = evaluate_ppl(
                emulator.model,
                server.held_out,
                cfg.train.eval_batch_size,
                server.pad_id,
                server.device,
            )
            rows.append(
                {
                    "level": level,
                    "distilled": distilled,
                    "ppl": result.ppl,
                    "params": shape_of(emulator.model).params,
                    "layers": len(emulator.layers),
                    "bytes": package(emulator, wire).nbytes,
                    "need_mb": server.memory_need_mb(level),
                    "seconds": time.perf_counter() - start,
                    "full_model": False,
                }
            )
            logging.info("level %.2f distilled=%s ppl %.2f", level, distilled, result.ppl)
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "held_out_samples": len(server.held_out),
        "distill_steps": cfg.emulator.distill.steps if distill or configured else 0,
        "configured_distilled": configured,
        "bottom": cfg.emulator.bottom,
        "top": cfg.emulator.top,
        "rows": rows,
    }


def curve_yaml(curve: dict[str, Any]) -> str:
    """The curve as `conf/controller/common.yaml` holds it (`curve_model`, `ppl_full`, one point
    per level of the emulators the config hands out, distilled or not: keep, ppl, bytes,
    params, need_mb), to paste there."""
    full = next(r for r in curve["rows"] if r["full_model"])
    distilled = bool(curve.get("configured_distilled", False))
    points = sorted(
        (r for r in curve["rows"] if not r["full_model"] and r["distilled"] == distilled),
        key=lambda r: -r["level"],
    )
    lines = [f"curve_model: {curve['model']}", f"ppl_full: {full['ppl']:.2f}", "curve:"]
    lines += [
        f"  - {{keep: {r['level']}, ppl: {r['ppl']:.2f}, bytes: {int(r['bytes'])}, "
        f"params: {int(r['params'])}, need_mb: {round(r['need_mb'])}}}"
        for r in points
    ]
    return "\n".join(lines)


def plot(curve: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    full = next(r for r in curve["rows"] if r["full_model"])
    for distilled, style in ((False, "o-"), (True, "s--")):
        rows = sorted(
            (r for r in curve["rows"] if not r["full_model"] and r["distilled"] == distilled),
            key=lambda r: r["level"],
        )
        if rows:
            label = "distilled" if distilled else "layer drop"
            ax.plot([r["level"] for r in rows], [r["ppl"] for r in rows], style, label=label)
    ax.axhline(full["ppl"], color="grey", linestyle=":", label=f"full model ({full['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("keep ratio of the middle layers")
    ax.set_ylabel("perplexity (server held-out, log)")
    ax.set_title(f"Emulator retention: {curve['model']} on {curve['data']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--overrides", default="", help="Hydra overrides (model=, data=, emulator.levels=...)"
    )
    parser.add_argument("--distill", action="store_true", help="also measure distilled emulators")
    parser.add_argument("--out", type=Path, default=Path("runs/retention"))
    parser.add_argument(
        "--yaml", action="store_true", help="also print the curve for conf/controller/common.yaml"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        curve = retention_curve(args.overrides, args.distill)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retention.json").write_text(json.dumps(curve, indent=2) + "\n")
    plot(curve, args.out / "retention.png")
    print(
        "| level | distilled | layers | params | MB on the wire | perplexity |\n"
        "|---|---|---|---|---|---|"
    )
    for r in curve["rows"]:
        name = "full model" if r["full_model"] else f"{r['level']:.2f}"
        print(
            f"| {name} | {'yes' if r['distilled'] else 'no'} | {r.get('layers', '-')} "
            f"| {r['params'] / 1e6:.1f}M "
            f"| {r['bytes'] / 2**20:.1f} | {r['ppl']:.2f} |"
        )
    if args.yaml:
        print(f"\n{curve_yaml(curve)}")
    print(f"\nwritten: {args.out / 'retention.json'}, {args.out / 'retention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
