"""The end of every round, in one place: the plug-in evaluation, the strategy's round end
(controller feedback, stats), the metrics row, the checkpoint, the plots and the progress line."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedpeat.config import Config
from fedpeat.outputs import MetricsLog, plot_metrics
from fedpeat.server_model import ServerModel
from fedpeat.train import EvalResult
from server_app.checkpoint import save_checkpoint
from strategies.fedpeat_strategy import FedPEAT
from strategies.round_stats import RoundStats, from_record


def gap_level(cfg: Config, stats: RoundStats) -> float | None:
    """The emulator level whose gap a round reports: the one most devices trained on (ties: the
    larger, the closer to the plug-in); case 2's shared level in round 0; None in case 3."""
    if cfg.emulator.case == 3:
        return None
    levels = [d.level for d in stats.devices.values() if d.status == "ok" and d.level < 1.0]
    if not levels:
        return cfg.emulator.shared_level if cfg.emulator.case == 2 else min(cfg.emulator.levels)
    return max(set(levels), key=lambda lv: (levels.count(lv), lv))


def improved(before: dict[str, Any], after: dict[str, Any], metric: str | None) -> bool:
    """Whether `after` scores better than `before` (`_validation` figures): on the task
    `metric` (every task metric here is higher-is-better) or, None, on perplexity."""
    if metric:
        return bool(after["task"][metric] > before["task"][metric])
    return bool(after["plugin_ppl"] < before["plugin_ppl"])


def _figures(result: EvalResult, task: dict[str, float] | None) -> dict[str, Any]:
    """`plugin_ppl` and, where measured, `task`: what `improved` compares and the row keeps."""
    return {"plugin_ppl": result.ppl, **({"task": task} if task is not None else {})}


class RoundRecorder:
    """Flower's `evaluate_fn`: evaluates the plug-in model and writes one metrics row per round.

    Flower calls it once before round 1 (round 0: the base model, since B starts at zero) and
    after every round, last in the round, so the strategy's stats for the round are complete.
    """

    def __init__(self, run_dir: Path, cfg: Config, strategy: FedPEAT, server: ServerModel) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.rounds = cfg.rounds
        self.strategy = strategy
        self.server = server
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.start = time.perf_counter()
        self.state: dict[str, np.ndarray] = dict(server.initial_state)
        # What the devices trained (the emulator carries it for the gap); `state` differs only
        # after knowledge back, which changes the plug-in's adapter alone.
        self.device_state = self.state
        # The final state's validation figures when knowledge back has measured them already
        # (state, perplexity, task metrics): the row reuses them instead of evaluating again.
        self._known: tuple[dict[str, np.ndarray], EvalResult, dict[str, float] | None] | None
        self._known = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.state = self.device_state = from_record(arrays)
        began = time.perf_counter()
        self._known = None
        aligned = self._align(server_round)
        known = self._known if self._known and self._known[0] is self.state else None
        result = known[1] if known else self.server.evaluate(self.state)
        stats = self.strategy.end_round(server_round, result.ppl)
        task = known[2] if known else None
        checks = {**aligned, **self._checks(server_round, stats, result.ppl, task)}
        elapsed = time.perf_counter() - self.start
        row = {
            "round": server_round,
            "plugin_ppl": result.ppl,
            "plugin_loss": result.loss,
            **checks,
            **stats.as_row(),
            "eval_s": time.perf_counter() - began,
            "elapsed_s": elapsed,
        }
        self.metrics.append(row)
        save_checkpoint(  # a resumed run continues from what the devices trained
            self.run_dir,
            server_round,
            self.device_state,
            self.metrics.rows,
            self.strategy.resume_state(),
            self.cfg,
        )
        plot_metrics(self.metrics.rows, self.run_dir)
        self._progress(server_round, result.ppl, stats, elapsed)
        return MetricRecord({"plugin_ppl": result.ppl})

    def _align(self, server_round: int) -> dict[str, Any]:
        """Knowledge back after the last round (`emulator.align.steps` > 0). The aligned
        adapter replaces the plug-in's only if it scores better on the validation split (the
        first task metric where there is one, else perplexity): the emulator can be the worse
        model, and imitating it then costs. The row keeps the figures from before."""
        stats = self.strategy.stats.get(server_round) or RoundStats()
        level = gap_level(self.cfg, stats)
        steps = self.cfg.emulator.align.steps
        if not steps or server_round != self.rounds or level is None or self.server.full_ft:
            return {}
        device_figures = self._validation(self.state)
        aligned, info = self.server.align(self.state, level)
        aligned_figures = self._validation(aligned)
        before, after = _figures(*device_figures), _figures(*aligned_figures)
        metric = self.cfg.eval.metrics[0] if "task" in before else None
        better = improved(before, after, metric)
        if better:
            self.state = aligned
        self._known = (self.state, *(aligned_figures if better else device_figures))
        log(
            INFO,
            "knowledge back: %d steps, KL %.4f -> %.4f; %s %.3f -> %.3f on validation: %s",
            steps,
            info["loss_first"],
            info["loss_last"],
            metric or "plug-in ppl",
            before["task"][metric] if metric else before["plugin_ppl"],
            after["task"][metric] if metric else after["plugin_ppl"],
            "kept" if better else "not kept (the devices' adapter stays)",
        )
        decided = {"kept": better, "decided_by": metric or "plugin_ppl"}
        return {"align": {**info, **decided, **{f"{k}_before": v for k, v in before.items()}}}

    def _validation(
        self, state: dict[str, np.ndarray]
    ) -> tuple[EvalResult, dict[str, float] | None]:
        """The plug-in's validation perplexity and task metrics (None where none is
        configured) for `state`."""
        scored = self.server.task_scores(state) if self.cfg.eval.metrics else None
        task = None if scored is None else {m: scored.value(m) for m in self.cfg.eval.metrics}
        return self.server.evaluate(state), task

    def _checks(
        self,
        server_round: int,
        stats: RoundStats,
        plugin_ppl: float,
        task: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Validation figures beyond the plug-in perplexity: task metrics (every `eval.every`
        rounds, round 0 and the last; `task`: already measured for this state) and the
        emulator-vs-plug-in gap (Offsite-Tuning's criterion) for the emulator most devices
        trained on this round."""
        ev = self.cfg.eval
        out: dict[str, Any] = {}
        if ev.metrics and (server_round % ev.every == 0 or server_round == self.rounds):
            if task is None:
                scored = self.server.task_scores(self.state)
                task = None if scored is None else {m: scored.value(m) for m in ev.metrics}
            if task is not None:
                out["task"] = task
        level = gap_level(self.cfg, stats)
        if ev.emulator_gap and level is not None:
            emu = self.server.emulator_ppl(level, self.device_state)
            out["gap"] = {
                "level": level,
                "emulator_ppl": emu.ppl,
                "plugin_ppl": plugin_ppl,
                "ratio": emu.ppl / plugin_ppl,
            }
        return out

    def _progress(self, server_round: int, ppl: float, stats: RoundStats, elapsed: float) -> None:
        zero = self.metrics.rows[0]["plugin_ppl"]
        eta = (
            elapsed / server_round * (self.rounds - server_round) if server_round else float("nan")
        )
        bar = "#" * server_round + "." * (self.rounds - server_round)
        log(
            INFO,
            "[%s] round %d/%d  plug-in ppl %.2f (round 0: %.2f)%s  emulator ppl %s  "
            "devices %d/%d  train loss %s  elapsed %.0fs  eta %s",
            bar,
            server_round,
            self.rounds,
            ppl,
            zero,
            "".join(f"  {k} {v:.1f}" for k, v in self.metrics.rows[-1].get("task", {}).items()),
            "-"
            if "gap" not in self.metrics.rows[-1]
            else f"{self.metrics.rows[-1]['gap']['emulator_ppl']:.2f}",
            stats.num_clients,
            stats.num_sampled,
            "-" if stats.train_loss is None else f"{stats.train_loss:.3f}",
            elapsed,
            "-" if np.isnan(eta) else f"{eta:.0f}s",
        )
