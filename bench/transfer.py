"""Does emulator-assisted tuning transfer? The same rounds and local steps for every row, the
server's own training off so every gain is the devices', measured on the test split.

Rows, per data set (E2E when ../shared/data/e2e is present, and Shakespeare):

  base          the model before tuning (round 0 of the case-3 run, test split)
  case3         federated LoRA on every layer of the full model (emulator=none)
  region        the full model with FedPEAT's adapter (the adapter region's matrices only)
  undistilled   FedPEAT with the default emulators but not distilled
  fedpeat       FedPEAT with the default emulators
  importance    the same with the middle layers chosen by block influence, not uniformly
  fedpeat_9_rounds  the same with three times the rounds (the one row with other rounds)
  held          the default emulators with LoRA on every layer they hold (`emulator.adapt=held`)
  held_kd       held layers, emulators distilled with `kd` alone (output KL) instead of layer-wise
  held_1500     held, every device on keep 0.4 (14 of 30 layers) distilled for 1,500 steps
                instead of 100 (the lean loop's strongest lever; budgets raised so all fit it)
  held_align    held, then knowledge back: after the last round the plug-in's adapter imitates
                the emulator carrying it on the server's prompts or text (no server labels),
                96 steps, kept only where it scores better on the validation split
  held_1500_align  held_1500, then knowledge back (the better emulator as the teacher)
  server        the server alone: its own data, no devices, same steps per round
  centralised   one LoRA with FedPEAT's adapter on the pooled device data, as many steps as
                all devices took together

Columns: test perplexity, BLEU and ROUGE-L (E2E), each with a bootstrap 95% interval over test
samples / prompts; the share of the model's layers and parameters a device held; bytes sent; the
emulator-vs-plug-in gap (Offsite-Tuning's criterion: the emulator must score clearly below).
Writes bench/results/transfer.{md,json}; runs go to runs/bench/ (`--reuse` keeps finished ones).

    python -m bench.transfer [--data e2e,shakespeare] [--reuse] [--rows a,b] [--seed 43]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, write_json, write_md
from bench.federated import RUNS_DIR, Spec, execute

E2E = Path("../shared/data/e2e/dev.jsonl")
DEVICES = 6
# The plain system (no planner, no controller: every device on the highest level that fits),
# so that the rows differ only in what they name; the default experiment plans and controls.
COMMON = "strategy.server_train=false eval.every=100 planner=none controller=none"
DATA = {"e2e": "experiment=e2e eval.test_samples=200", "shakespeare": "eval.test_samples=240"}
# At E2E's 96-token rows the watch and the sensor of the default devices fit no emulator and
# would sit out, while case 3 and the region row (the full model, no memory check) train all six:
# the emulator rows raise their budgets so every row learns from the same six devices' data.
E2E_BUDGETS = "devices.profiles.3.memory_mb=700 devices.profiles.4.memory_mb=650"
EMULATOR_ROWS = (
    "undistilled",
    "fedpeat",
    "importance",
    "fedpeat_9_rounds",
    "held",
    "held_kd",
    "held_align",
)
ROWS = {
    "case3": "emulator=none",
    "region": "emulator=none",  # + adapter.modules: the adapter region's matrices
    "undistilled": "emulator.distill.enabled=false",
    "fedpeat": "",
    "importance": "emulator.layer_choice=importance",
    # Not the same rounds as the others: how far more rounds take the emulators' adapter.
    "fedpeat_9_rounds": "rounds=9",
    "held": "emulator.adapt=held",
    "held_kd": "emulator.adapt=held emulator.distill.loss=kd",
    "held_align": "emulator.adapt=held emulator.align.steps=96",
    "held_1500": "emulator.adapt=held emulator.distill.steps=1500 emulator.levels=[0.4] "
    + " ".join(f"devices.profiles.{i}.memory_mb=900" for i in (1, 2, 3, 4)),
}
ROWS["held_1500_align"] = ROWS["held_1500"] + " emulator.align.steps=96"


def region_modules(overrides: str) -> str:
    """`adapter.modules=[...]`: the default adapter's projections on the adapter region only."""
    from fedpeat.config import compose
    from fedpeat.emulator import adapter_region
    from fedpeat.model import load_model

    cfg = compose(overrides)
    n = int(load_model(cfg.model).config.num_hidden_layers)
    layers = adapter_region(n, cfg.emulator.bottom, cfg.emulator.top)
    mods = [f"layers.{i}.{m}" for i in layers for m in _paths(cfg.adapter.target_modules)]
    return "adapter.modules=[" + ",".join(mods) + "]"


def _paths(projections: list[str]) -> list[str]:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"self_attn.{p}" if p in attn else f"mlp.{p}" for p in projections]


def own_training(overrides: str, pooled: bool) -> dict[str, Any]:
    """The server alone (`pooled=False`: its own data, rounds x local steps) or centralised
    LoRA on the pooled device data (as many steps as all devices took), FedPEAT's adapter."""
    from fedpeat.config import compose, resolve_paths
    from fedpeat.data import device_data, encode
    from fedpeat.server_model import ServerModel

    cfg = resolve_paths(compose(overrides), Path.cwd())
    t = cfg.train
    steps = t.local_steps * (cfg.rounds * DEVICES if pooled else 1)
    cfg = replace(cfg, train=replace(t, local_steps=steps))
    server = ServerModel(cfg)
    if pooled:
        data = [
            s
            for i in range(DEVICES)
            for s in device_data(cfg.data, cfg.partition, i, DEVICES).train
        ]
        server.train_data = encode(data, server.tokenizer, cfg.data.max_length)
    began = time.perf_counter()
    state = server.initial_state
    for r in range(1 if pooled else cfg.rounds):
        state, _, _ = server.train(state, r + 1)
    return {
        "test": {"plugin": server.report(state, "test")},
        "summary": {"bytes_total": 0},  # no device holds anything
        "steps": steps if pooled else steps * cfg.rounds,
        "wall_s": time.perf_counter() - began,
    }


SEED = 42  # the config's seed: the committed table's rows


def run_rows(
    data: str,
    reuse: bool,
    report_only: bool = False,
    only: list[str] | None = None,
    seed: int = SEED,
) -> dict[str, Any]:
    """The rows of `data` (`only`: those named); `report_only`: only the rows already run
    (no new work); `seed`: another training seed, its runs kept apart from the table's."""
    base = f"{DATA[data]} {COMMON}".strip() + ("" if seed == SEED else f" seed={seed}")
    prefix = "transfer" if seed == SEED else f"transfer-seed{seed}"
    out: dict[str, Any] = {}
    for name, extra in ROWS.items():
        finished = (RUNS_DIR / f"{prefix}-{data}-{name}" / "summary.json").is_file()
        if only and name not in only and not finished:
            continue
        overrides = f"{base} {extra}".strip()
        if data == "e2e" and name in EMULATOR_ROWS:
            overrides += " " + E2E_BUDGETS
        if name == "region":
            overrides += " " + region_modules(f"{base} emulator=per_device")
        began = time.perf_counter()
        if report_only and not finished:
            continue
        # A finished row not named in `only` is kept as it is, never run again.
        keep = reuse or bool(only and name not in only)
        run_dir = execute(Spec(f"{prefix}-{data}-{name}", name, overrides, seed), DEVICES, keep)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.pop("run_dir", None)  # a path of this machine: not for a committed result
        out[name] = {
            "overrides": overrides,
            "summary": summary,
            "test": json.loads((run_dir / "test.json").read_text()),
            "wall_s": time.perf_counter() - began,
        }
        print(f"{data} {name}: {_line(out[name])}", flush=True)
    if "case3" in out:
        out["base"] = {"test": {"plugin": out["case3"]["test"]["base"]}, "summary": {}}
    for name, pooled in (("server", False), ("centralised", True)):
        # Not a Flower run: the row is kept as one JSON file beside the federated runs.
        saved = RUNS_DIR / f"{prefix}-{data}-{name}" / "result.json"
        if reuse and saved.is_file():
            out[name] = json.loads(saved.read_text())
        elif (only and name not in only) or report_only:
            continue
        else:
            out[name] = own_training(f"{base} strategy.server_train=true", pooled)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(out[name], indent=1))
        print(f"{data} {name}: {_line(out[name])}", flush=True)
    return out


def _line(row: dict[str, Any]) -> str:
    p = row["test"]["plugin"]
    return " ".join(f"{k} {p[k]:.2f}" for k in ("ppl", "bleu", "rouge_l") if k in p)


def _cell(p: dict[str, Any], key: str) -> str:
    if key not in p:
        return "-"
    lo, hi = p.get(f"{key}_ci") or (float("nan"), float("nan"))
    return f"{p[key]:.2f} [{lo:.2f}, {hi:.2f}]"


ORDER = [
    "base",
    "case3",
    "region",
    "undistilled",
    "fedpeat",
    "importance",
    "held",
    "held_kd",
    "held_1500",
    "held_align",
    "held_1500_align",
    "server",
    "centralised",
    "fedpeat_9_rounds",
]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Transfer: does training on an emulator improve the full model?",
        "",
        f"`python -m bench.transfer` on {results['machine']}, seed {results.get('seed', SEED)}. "
        f"{results['rounds']} rounds "
        "(the `fedpeat_9_rounds` row: 9), "
        f"{DEVICES} devices, the default local steps, `{COMMON}` (the server does not train, so "
        "every gain is the devices'); figures on the test split with bootstrap 95% intervals. "
        "Decisions (the default emulator recipe) were made on the validation split. A row "
        "marked `not run` has no finished run under runs/bench/: `python -m bench.transfer "
        "--reuse` runs it and keeps the others.",
    ]
    if "e2e" in results["data"]:
        lines += [
            "",
            f"E2E: the emulator rows add `{E2E_BUDGETS}`: at 96-token rows the watch and the "
            "sensor fit no emulator, while case 3 and the region row (the full model, no memory "
            "check) train all six devices; so every row learns from the same data.",
        ]
    for data, rows in results["data"].items():
        lines += [
            "",
            f"## {data}",
            "",
            "| row | test ppl | BLEU | ROUGE-L | layers held | params held | MB sent | "
            "emulator ppl / BLEU (gap) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in ORDER:
            if name not in rows:
                lines.append(f"| {name} | not run | | | | | | |")
                continue
            row = rows[name]
            p, s = row["test"]["plugin"], row["summary"]
            emu = row["test"].get("emulator") or {}
            bleu = f"{emu['bleu']:.2f}" if "bleu" in emu else "-"
            gap = f"{emu['ppl']:.2f} / {bleu}" if emu else "-"
            layers = s.get("device_layers_share")
            params = s.get("device_params_share")
            lines.append(
                f"| {name} | {_cell(p, 'ppl')} | {_cell(p, 'bleu')} | {_cell(p, 'rouge_l')} | "
                f"{'-' if layers is None else f'{layers:.2f}'} | "
                f"{'-' if params is None else f'{params:.2f}'} | "
                f"{s.get('bytes_total', 0) / 1e6:.1f} | {gap} |"
            )
        lines += ["", *ratios(rows)]
    return "\n".join(lines) + "\n"


def ratios(rows: dict[str, Any]) -> list[str]:
    """FedPEAT (and its 9-round row, where run) against case 3: BLEU share, and share of the
    perplexity reduction."""
    if not all(k in rows for k in ("base", "case3", "fedpeat")):
        return ["- FedPEAT or case 3 not run: no ratio"]
    base, c3 = rows["base"]["test"]["plugin"], rows["case3"]["test"]["plugin"]
    out = []
    labels = (
        ("fedpeat", "FedPEAT"),
        ("held", "FedPEAT, LoRA on every held layer,"),
        ("held_kd", "FedPEAT, held layers, kd distillation,"),
        ("held_1500", "FedPEAT, held layers, keep 0.4 distilled 1,500 steps,"),
        ("held_align", "FedPEAT, held layers, knowledge back,"),
        ("held_1500_align", "FedPEAT, keep 0.4 distilled 1,500 steps, knowledge back,"),
        ("fedpeat_9_rounds", "FedPEAT, 9 rounds,"),
    )
    for name, label in labels:
        if name not in rows:
            continue
        fp = rows[name]["test"]["plugin"]
        if "bleu" in c3:
            out.append(f"- {label} BLEU / case-3 BLEU: {fp['bleu'] / c3['bleu']:.2f} (target 0.90)")
        cut = (base["ppl"] - fp["ppl"]) / (base["ppl"] - c3["ppl"])
        out.append(f"- {label} perplexity reduction / case 3's: {cut:.2f} (target 0.80)")
    return out


_ELSEWHERE = " (rows not run by this call: "


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="e2e,shakespeare")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the tables from the federated runs already under runs/bench (no new runs)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the committed bench/results/transfer.json that this call does "
        "not run (a new row on another machine without re-running the others)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="training seed of every row (how far a row moves between seeds); another than "
        f"{SEED} writes transfer_seed<N>.{{md,json}} from runs/bench/transfer-seed<N>-*",
    )
    args = parser.parse_args()
    from fedpeat.config import compose

    # Another seed is a file of its own: the table stays the default seed's.
    stem = "transfer" if args.seed == SEED else f"transfer_seed{args.seed}"
    earlier = json.loads((RESULTS / f"{stem}.json").read_text()) if args.merge else {}
    kept = earlier.get("data", {})
    here = machine()
    if earlier:  # quality figures, but say where each ran: every machine named before, once
        *named, last = [m.rstrip(")") for m in earlier["machine"].split(_ELSEWHERE)]
        others = sorted({*named, last} - {here})
        here += f"{_ELSEWHERE}{'; '.join(others)})" if others else ""
    results: dict[str, Any] = {"machine": here, "rounds": compose("").rounds, "seed": args.seed}
    results["data"] = {data: dict(rows) for data, rows in kept.items()}
    for data in args.data.split(","):
        if data == "e2e" and not E2E.is_file():
            print(f"skipping e2e: {E2E} is absent")
            continue
        rows = run_rows(
            data,
            args.reuse or args.report_only,
            args.report_only,
            [r for r in args.rows.split(",") if r],
            args.seed,
        )
        results["data"][data] = {**results["data"].get(data, {}), **rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(f"{stem}.json", results)
    write_md(f"{stem}.md", markdown(results))


if __name__ == "__main__":
    main()
