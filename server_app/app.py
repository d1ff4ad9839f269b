"""fedpeat ServerApp: compose the config, federate the LoRA adapter, write the run directory."""

from __future__ import annotations

import os
import time
import traceback
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpeat.config import Config, compose, resolve_paths, to_yaml
from fedpeat.data import load_samples
from fedpeat.model import describe, model_location
from fedpeat.outputs import new_run_dir, plot_metrics, time_to_target, write_json_atomic
from fedpeat.server_model import ServerModel
from server_app.checkpoint import Checkpoint, open_resume, restore_rngs
from server_app.recorder import RoundRecorder, gap_level
from strategies.fedpeat_strategy import FedPEAT
from strategies.round_stats import RoundStats, to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    workdir = Path(str(rc.get("workdir") or os.getcwd()))
    # Everything that can be wrong with the input fails here, before a run directory exists.
    cfg = resolve_paths(compose(str(rc.get("overrides", ""))), workdir)
    load_samples(cfg.data)
    checkpoint = _checkpoint(cfg, workdir)
    output_dir = Path(str(rc.get("output-dir") or "runs"))
    output_dir = output_dir if output_dir.is_absolute() else workdir / output_dir

    resume = None
    if cfg.resume:
        run_dir, resume = open_resume(cfg, workdir)
        log(
            INFO,
            "fedpeat run %s: resuming %s after round %d",
            context.run_id,
            run_dir,
            resume.round,
        )
    else:
        run_dir = new_run_dir(output_dir, cfg.experiment, context.run_id)
        log(INFO, "fedpeat run %s: outputs in %s", context.run_id, run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    try:
        _run(grid, cfg, run_dir, checkpoint, resume)
    except BaseException:
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise


def _checkpoint(cfg: Config, workdir: Path) -> Path | None:
    """The pre-trained policy for controller=ppo, relative paths under the project directory;
    missing: a clear error before any round."""
    if cfg.controller.name != "ppo" or not cfg.controller.ppo.checkpoint:
        return None
    path = Path(cfg.controller.ppo.checkpoint)
    path = path if path.is_absolute() else workdir / path
    if not path.is_file():
        raise FileNotFoundError(
            f"controller.ppo.checkpoint: no file at {path}; pre-train one with "
            "`python -m strategies.control pretrain` (or set controller.ppo.checkpoint='')"
        )
    return path


def _run(
    grid: Grid,
    cfg: Config,
    run_dir: Path,
    checkpoint: Path | None = None,
    resume: Checkpoint | None = None,
) -> None:
    start = time.perf_counter()
    for stale in ("error.txt", "summary.json"):  # a resumed run's earlier ending, if any
        if (run_dir / stale).exists():
            (run_dir / stale).replace(run_dir / f"{stale}.before-resume")
    server = ServerModel(cfg)
    log(INFO, "model %s: %s", cfg.model.name, describe(server.model.get_base_model()))
    if server.importance:
        write_json_atomic(run_dir / "importance.json", server.importance)
        log(
            INFO,
            "LoRA on %d matrices (%s)",
            len(server.adapter_cfg.modules),
            server.importance["choice"],
        )
    strategy = FedPEAT(cfg, server, checkpoint)
    recorder = RoundRecorder(run_dir, cfg, strategy, server)
    initial, first_round = server.initial_state, 1
    if resume is not None:
        strategy.restore(resume.strategy)
        recorder.metrics.restore(resume.rows)
        recorder.state = recorder.device_state = initial = resume.state
        recorder.start -= float(resume.rows[-1].get("elapsed_s") or 0.0)  # time continues
        first_round = resume.round + 1
        restore_rngs(resume)

    strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.round_timeout_s,
        evaluate_fn=recorder,
        first_round=first_round,
    )

    if cfg.controller.name != "none":
        strategy.control.save(run_dir / "controller.pt")
    if not server.full_ft:  # fed_ft trains every weight: its result is merged/ alone
        server.save_adapter(recorder.state, str(run_dir / "adapter"), model_location(cfg.model))
    if cfg.export_merged or server.full_ft:
        server.save_merged(recorder.state, str(run_dir / "merged"))
    rows = recorder.metrics.rows
    plot_metrics(rows, run_dir)
    log(INFO, "test split: base and final plug-in model%s", split_note(cfg))
    level = gap_level(cfg, strategy.stats.get(cfg.rounds) or RoundStats())
    base = server.report(server.initial_state, "test")
    plugin = server.report(recorder.state, "test")
    # The emulator carries what the devices trained (before knowledge back, if any).
    emulator = {} if level is None else server.report(recorder.device_state, "test", level)
    test = {"base": base, "plugin": plugin, "emulator": emulator, "emulator_level": level}
    write_json_atomic(run_dir / "test.json", test)
    best = min(rows, key=lambda r: r["plugin_ppl"])
    summary = {
        "status": "completed",
        "experiment": cfg.experiment,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "rounds": cfg.rounds,
        "zero_shot_ppl": rows[0]["plugin_ppl"],
        "final_plugin_ppl": rows[-1]["plugin_ppl"],
        "best_plugin_ppl": best["plugin_ppl"],
        "best_round": best["round"],
        "test_base_ppl": base["ppl"],
        "test_plugin_ppl": plugin["ppl"],
        "test_plugin_ppl_ci": plugin.get("ppl_ci"),
        "test_emulator_ppl": emulator.get("ppl"),
        **{f"test_{m}": plugin.get(m) for m in cfg.eval.metrics},
        **{f"test_emulator_{m}": emulator.get(m) for m in cfg.eval.metrics if emulator},
        "bytes_down_total": sum(r.get("bytes_down", 0) for r in rows),
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in rows),
        "rejected_total": sum(len(r.get("rejected", [])) for r in rows),
        "exchanges_total": sum(r.get("exchanges", 0) for r in rows),
        "bytes_total": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rows),
        "controller": cfg.controller.name,
        "target_ppl": cfg.controller.target_ppl,
        "time_to_target_s": time_to_target(rows, cfg.controller.target_ppl),
        "modelled_latency_total_s": sum(r.get("latency_s") or 0.0 for r in rows),
        "reward_total": sum(r.get("reward") or 0.0 for r in rows),
        "emulator_case": cfg.emulator.case,
        **held_share(server, level),
        "final_emulator_ppl": rows[-1].get("emulator_ppl"),
        "wall_s": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    write_json_atomic(run_dir / "summary.json", summary)
    log(
        INFO,
        "done: plug-in ppl %.2f -> %.2f in %d rounds (test: %.2f -> %.2f%s), %.0fs; results in %s",
        summary["zero_shot_ppl"],
        summary["final_plugin_ppl"],
        cfg.rounds,
        base["ppl"],
        plugin["ppl"],
        "".join(f", {m} {base.get(m, 0):.1f} -> {plugin.get(m, 0):.1f}" for m in cfg.eval.metrics),
        summary["wall_s"],
        run_dir,
    )


def held_share(server: ServerModel, level: float | None) -> dict[str, float]:
    """The share of the full model's decoder layers and parameters a device held (the
    emulator at `level`; None: the full model, case 3)."""
    full, held = server.full_shape, server.emulator_shape(level)
    return {
        "device_layers_share": held.layers / full.layers,
        "device_params_share": held.params / full.params,
    }


def split_note(cfg: Config) -> str:
    if not cfg.eval.metrics:
        return ""
    return f" ({', '.join(cfg.eval.metrics)} on up to {cfg.eval.prompts or 'all'} prompts)"
