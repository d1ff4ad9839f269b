"""The figures and tables of `bench.federated`, from the runs' metrics: time and bytes to the
target, bytes per device and round, plug-in quality against case 3 and the centralised bound,
and where a round's wall time goes (pure functions, then the markdown and the plots)."""

from __future__ import annotations

import itertools
import statistics
from typing import TYPE_CHECKING, Any

from bench.common import RESULTS, table

if TYPE_CHECKING:  # the runs import this module
    from bench.federated import Spec

CONTROLLERS = ("ppo", "greedy", "random", "fixed")

# ----------------------------------------------------------------------------- figures


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def reached_round(rows: list[dict[str, Any]], target: float) -> int | None:
    """The first round whose plug-in perplexity is at or below `target`."""
    return next((int(r["round"]) for r in rows if r["plugin_ppl"] <= target), None)


def bytes_until(rows: list[dict[str, Any]], last_round: int | None) -> float | None:
    """Bytes down and up of rounds 1..last_round (emulators included); None if not reached."""
    if last_round is None:
        return None
    return float(
        sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rows if r["round"] <= last_round)
    )


def device_steps(rows: list[dict[str, Any]], local_steps: int, server_train: bool) -> int:
    """Optimizer steps a run took in all: every device that trained validly, and the server."""
    steps = 0
    for r in rows[1:]:
        ok = sum(1 for d in r.get("devices", []) if d.get("status") == "ok")
        steps += local_steps * (ok + (1 if server_train else 0))
    return steps


def per_device_bytes(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean bytes a device moved in one train round, by level (keep ratio; 1.0 for full-model
    runs): `first` in rounds its emulator travelled with the adapter, `later` in rounds with the
    adapter alone (a device that holds its emulator; every round where none travels)."""
    acc: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for run in runs:
        for r in run["rows"][1:]:
            for d in r.get("devices", []):
                if d.get("status") != "ok":
                    continue
                when = "first" if d.get("emulator_sent") else "later"
                acc.setdefault((str(d["level"]), when), []).append(
                    (int(d["bytes_down"]), int(d["bytes_up"]))
                )
    out: dict[str, dict[str, float]] = {}
    for (level, when), pairs in acc.items():
        out.setdefault(level, {})[f"{when}_down"] = statistics.fmean(p[0] for p in pairs)
        out[level][f"{when}_up"] = statistics.fmean(p[1] for p in pairs)
    return out


def round_overhead(rows: list[dict[str, Any]], workers: int) -> list[dict[str, float]]:
    """Where each round's wall time went (seconds): the devices' local training and whole
    handlers divided by the parallel workers, the server's phases, and what the exchanges took
    beyond the devices' own work (Flower's messaging, and Ray's where it runs)."""
    out = []
    for prev, r in itertools.pairwise(rows):
        t = r.get("timing") or {}
        devs = [d for d in r.get("devices", []) if d.get("train_s") is not None]
        train = sum(d["train_s"] for d in devs)
        handlers = sum(d.get("handler_s") or 0.0 for d in devs) + t.get("client_eval_sum", 0.0)
        exchanges = t.get("train_exchange", 0.0) + t.get("evaluate_exchange", 0.0)
        server = t.get("configure", 0.0) + t.get("server_train", 0.0) + t.get("aggregate", 0.0)
        wall = float(r["elapsed_s"]) - float(prev["elapsed_s"])
        out.append(
            {
                "round": int(r["round"]),
                "wall_s": wall,
                "devices": len(devs),
                "local_train_s": train / workers,
                "client_handlers_s": handlers / workers,
                "server_eval_s": float(r.get("eval_s") or 0.0),
                "server_other_s": server,
                "exchange_s": exchanges,
                # The devices' profile query: under Ray its first one also starts the workers.
                "profile_s": t.get("profile", 0.0),
                "transport_s": max(0.0, exchanges - handlers / workers),
                "rest_s": wall
                - exchanges
                - server
                - t.get("profile", 0.0)
                - float(r.get("eval_s") or 0.0),
            }
        )
    return out


# ----------------------------------------------------------------------------- report


def _fmt_s(v: dict[str, float]) -> str:
    return f"{v['mean']:.0f} +- {v['std']:.0f} ({v['min']:.0f}-{v['max']:.0f})"


def report(
    runs: dict[str, dict[str, Any]],
    specs: list[Spec],
    central: list[dict[str, Any]],
    target: float,
    workers: int,
) -> dict[str, Any]:
    systems = [*list(CONTROLLERS), "fed_ft"]
    by_system: dict[str, list[dict[str, Any]]] = {s: [] for s in [*systems, "case3"]}
    for spec in specs:
        by_system[spec.system].append({**runs[spec.name], "spec": spec})

    # -- time to target
    ttt: dict[str, Any] = {}
    for s in systems:
        times = [r["summary"]["time_to_target_s"] for r in by_system[s]]
        reached = [t for t in times if t is not None]
        rounds = [reached_round(r["rows"], target) for r in by_system[s]]
        total = [bytes_until(r["rows"], n) for r, n in zip(by_system[s], rounds, strict=True)]
        ttt[s] = {
            "seeds": [r["spec"].seed for r in by_system[s]],
            "time_to_target_s": times,
            "rounds_to_target": rounds,
            "bytes_to_target": total,
            "reached": len(reached),
            "time": spread(reached) if reached else None,
            "bytes": spread([b for b in total if b is not None]) if reached else None,
            "final_ppl": spread([r["summary"]["final_plugin_ppl"] for r in by_system[s]]),
        }
    ppo = ttt["ppo"]["time"]
    others = {s: v["time"] for s, v in ttt.items() if s != "ppo"}
    beats = {
        s: ppo is not None
        and ttt["ppo"]["reached"] == len(ttt["ppo"]["seeds"])
        and (t is None or ppo["mean"] < t["mean"])
        for s, t in others.items()
    }
    per_seed = {
        s: sum(
            1
            for p, o in zip(ttt["ppo"]["time_to_target_s"], ttt[s]["time_to_target_s"], strict=True)
            if p is not None and (o is None or p < o)
        )
        for s in others
    }

    # -- communication per device and round
    comm = per_device_bytes([r for s in CONTROLLERS for r in by_system[s]])
    fed = per_device_bytes(by_system["fed_ft"]).get("1.0", {})
    case3 = per_device_bytes(by_system["case3"]).get("1.0", {})
    fed_round = fed.get("later_down", 0.0) + fed.get("later_up", 0.0)

    # -- quality
    ppo_runs = by_system["ppo"]
    zero = ppo_runs[0]["rows"][0]["plugin_ppl"]
    central_ppl = spread([c["ppl"] for c in central])
    fed_ppl = ttt["ppo"]["final_ppl"]
    gap = [
        r["summary"]["final_emulator_ppl"] / r["summary"]["final_plugin_ppl"]
        for s in CONTROLLERS
        for r in by_system[s]
        if r["summary"].get("final_emulator_ppl")
    ]
    quality = {
        "zero_shot": zero,
        "fedpeat_ppo": fed_ppl,
        "controllers": {s: ttt[s]["final_ppl"] for s in CONTROLLERS},
        "case3": [r["summary"]["final_plugin_ppl"] for r in by_system["case3"]],
        "fed_ft_round1": ttt["fed_ft"]["final_ppl"],
        "centralised": central,
        "centralised_ppl": central_ppl,
        "ratio_to_centralised": fed_ppl["mean"] / central_ppl["mean"],
        "emulator_over_plugin": spread(gap) if gap else None,
    }

    # -- overhead
    overhead = {
        f"flwr run {spec.name}": {
            "workers": workers,
            "rounds": round_overhead(runs[spec.name]["rows"], workers),
        }
        for spec in specs
        if spec.ray
    }
    return {
        "target_ppl": target,
        "time_to_target": ttt,
        "ppo_beats": beats,
        "ppo_wins_per_seed": per_seed,
        "communication": {"fedpeat": comm, "fed_ft": fed, "case3": case3},
        "fed_ft_round_bytes": fed_round,
        "quality": quality,
        "overhead": overhead,
    }


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def markdown(rep: dict[str, Any], where: str) -> dict[str, str]:
    ttt, target = rep["time_to_target"], rep["target_ppl"]
    rows = []
    for s, v in ttt.items():
        n_seeds = len(v["seeds"])
        rows.append(
            [
                "Fed-FT" if s == "fed_ft" else f"controller={s}",
                f"{v['reached']}/{n_seeds}",
                _fmt_s(v["time"]) if v["time"] else "not reached",
                " / ".join("-" if t is None else f"{t:.0f}" for t in v["time_to_target_s"]),
                " / ".join("-" if n is None else str(n) for n in v["rounds_to_target"]),
                "-" if v["bytes"] is None else f"{v['bytes']['mean'] / 1e6:.1f}",
                f"{v['final_ppl']['mean']:.2f}",
            ]
        )
    seeds = ", ".join(str(s) for s in ttt["ppo"]["seeds"])
    beats = rep["ppo_beats"]
    met = all(beats.values())
    tt = "\n".join(
        [
            table(
                [
                    "system",
                    "reached",
                    f"modelled s to ppl {target:g}: mean +- std (min-max)",
                    "per seed",
                    "round reached",
                    "MB until target (mean)",
                    "final plug-in ppl (mean)",
                ],
                rows,
            ),
            "",
            f"Seeds {seeds}; Fed-FT runs one round. Target: PPO reaches ppl {target:g} in less "
            f"modelled time than every other system: {'met' if met else 'missed'} "
            f"({', '.join(f'{s}: {beats[s]}' for s in beats)}); PPO faster per seed: "
            + ", ".join(
                f"{s} {n}/{len(ttt['ppo']['seeds'])}" for s, n in rep["ppo_wins_per_seed"].items()
            )
            + ".",
            "",
            where,
        ]
    )

    comm, fed = rep["communication"], rep["communication"]["fed_ft"]
    fed_round = rep["fed_ft_round_bytes"]
    crow = [
        [
            "Fed-FT (full model, fp32, both ways every round)",
            _mb(fed.get("later_down")),
            _mb(fed.get("later_up")),
            _mb(fed.get("later_down")),
            _mb(fed.get("later_up")),
            "1",
        ]
    ]
    c3 = comm["case3"]
    crow.append(
        [
            "case 3 / FlowerTune-style (full model on the device, the adapter travels)",
            _mb(c3.get("later_down")),
            _mb(c3.get("later_up")),
            _mb(c3.get("later_down")),
            _mb(c3.get("later_up")),
            f"1/{fed_round / (c3['later_down'] + c3['later_up']):.0f}"
            if "later_down" in c3
            else "-",
        ]
    )
    for level in sorted(comm["fedpeat"], key=float, reverse=True):
        v = comm["fedpeat"][level]
        later = v.get("later_down", 0.0) + v.get("later_up", 0.0)
        crow.append(
            [
                f"FedPEAT emulator keep {level} (16-bit or 4-bit: the same fp16 wire)",
                _mb(v.get("first_down")),
                _mb(v.get("first_up")),
                _mb(v.get("later_down")),
                _mb(v.get("later_up")),
                f"1/{fed_round / later:.0f}" if later else "-",
            ]
        )
    half = comm["fedpeat"].get("0.5", {})
    later = half.get("later_down", 0.0) + half.get("later_up", 0.0)
    ratio = later / fed_round if fed_round and later else None
    cm = "\n".join(
        [
            table(
                [
                    "per device and round",
                    "with the emulator: down MB",
                    "up MB",
                    "adapter only: down MB",
                    "up MB",
                    "adapter-only round vs Fed-FT",
                ],
                crow,
            ),
            "",
            "Down: the train message (adapter, plan, and the emulator in a device's first round); "
            "up: the device's reply, measured from the runs' messages (metrics.jsonl). Case 3 "
            "devices hold the full model already (FlowerTune's download it from a hub), so it "
            "never travels. The evaluate exchange (the adapter once more each way, when devices "
            "evaluate) is in the totals until the target (time_to_target.md), not here.",
            "",
            "Target: keep 0.5 needs at most 1/100 of Fed-FT's bytes per round: "
            + (
                "not measured (no adapter-only keep 0.5 round)"
                if ratio is None
                else f"{ratio:.5f} (1/{1 / ratio:.0f}): {'met' if ratio <= 0.01 else 'missed'}"
            )
            + (
                f"; a round that also carries the emulator (once per device), "
                f"{(half['first_down'] + half['first_up']) / fed_round:.3f}."
                if "first_down" in half
                else "."
            ),
        ]
    )

    q = rep["quality"]
    cent = q["centralised_ppl"]
    qrows = [
        ["zero-shot (base model)", f"{q['zero_shot']:.2f}", "-"],
        [
            f"centralised LoRA, pooled data, {q['centralised'][0]['steps']} steps (upper bound)",
            f"{cent['mean']:.2f} +- {cent['std']:.2f}",
            "1.00",
        ],
    ]
    for s, v in q["controllers"].items():
        qrows.append(
            [
                f"FedPEAT controller={s}",
                f"{v['mean']:.2f} +- {v['std']:.2f}",
                f"{v['mean'] / cent['mean']:.2f}",
            ]
        )
    for p in q["case3"]:
        qrows.append(
            ["case 3: federated LoRA on the full model", f"{p:.2f}", f"{p / cent['mean']:.2f}"]
        )
    f1 = q["fed_ft_round1"]
    qrows.append(
        ["Fed-FT after its one round", f"{f1['mean']:.2f}", f"{f1['mean'] / cent['mean']:.2f}"]
    )
    r = q["ratio_to_centralised"]
    gap = q["emulator_over_plugin"]
    qt = "\n".join(
        [
            table(["model", "final plug-in ppl (mean +- std over seeds)", "vs centralised"], qrows),
            "",
            f"Target: FedPEAT (ppo) within 10% of the centralised bound: {r:.2f}x, "
            + ("met." if r <= 1.10 else f"missed by {100 * (r - 1.10):.0f} points."),
            "Emulator-vs-plug-in gap (device-evaluated emulator ppl / plug-in ppl, final round): "
            + ("-" if gap is None else f"{gap['mean']:.2f}x ({gap['min']:.2f}-{gap['max']:.2f})")
            + ".",
        ]
    )

    orows = []
    for name, o in rep["overhead"].items():
        for rr in o["rounds"]:
            busy = rr["local_train_s"] + rr["server_eval_s"]
            orows.append(
                [
                    name,
                    rr["round"],
                    rr["devices"],
                    f"{rr['wall_s']:.1f}",
                    f"{rr['local_train_s']:.1f}",
                    f"{rr['server_eval_s']:.1f}",
                    f"{rr['wall_s'] / busy:.2f}" if busy else "-",
                    f"{rr['client_handlers_s']:.1f}",
                    f"{rr['server_other_s']:.1f}",
                    f"{rr['profile_s']:.1f}",
                    f"{rr['transport_s']:.1f} ({100 * rr['transport_s'] / rr['wall_s']:.0f}%)",
                ]
            )
    ot = table(
        [
            "run",
            "round",
            "devices",
            "round wall s",
            "local training / workers s",
            "server eval s",
            "wall / (training + eval)",
            "device handlers / workers s",
            "server plan + own training + aggregation s",
            "profile query s",
            "exchanges beyond device work s (share of wall)",
        ],
        orows,
    )
    return {"time_to_target": tt, "communication": cm, "quality": qt, "overhead": ot}


def plots(rep: dict[str, Any], runs: dict[str, dict[str, Any]], specs: list[Spec]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttt = rep["time_to_target"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(ttt)
    for i, s in enumerate(names):
        ts = [t for t in ttt[s]["time_to_target_s"] if t is not None]
        if ts:
            ax.bar(i, statistics.fmean(ts), color="C0" if s == "ppo" else "C7", alpha=0.7)
            ax.scatter([i] * len(ts), ts, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), ["Fed-FT" if n == "fed_ft" else n for n in names])
    ax.set_yscale("log")
    ax.set_ylabel(f"modelled s to plug-in ppl {rep['target_ppl']:g}")
    ax.set_title("Time to target (bars: mean, dots: seeds)")
    fig.tight_layout()
    fig.savefig(RESULTS / "time_to_target.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in specs:
        if spec.system in ("ppo", "case3", "fixed") and spec.seed == specs[0].seed:
            rows = runs[spec.name]["rows"]
            ax.plot(
                [r["round"] for r in rows],
                [r["plugin_ppl"] for r in rows],
                marker="o",
                label=f"{spec.system} (plug-in)",
            )
    cent = rep["quality"]["centralised_ppl"]["mean"]
    ax.axhline(cent, color="k", ls="--", label="centralised bound")
    ax.axhline(rep["target_ppl"], color="C3", ls=":", label="target")
    ax.set_xlabel("round")
    ax.set_ylabel("plug-in perplexity (server held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)
    plt.close(fig)
