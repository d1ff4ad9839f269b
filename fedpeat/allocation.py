"""FedPipe allocation: per device a LoRA rank, batch size, bit-width and module share, chosen by
a mixed-integer program (scipy's `milp`, HiGHS). Pure functions; the estimates are inputs.

Each device i has a menu of options o (every combination of the configured ranks, batch sizes,
bit-widths and module shares) with, from the cost model, estimated memory m_io (MB), round time
t_io (s) and upload u_io (MB), and a value v_io = importance of the modules trained x rank x
fidelity of the bit-width x examples seen in the round. With x_io binary:

    maximise    sum_io v_io x_io
    subject to  sum_o x_io <= 1                       (one plan per device, or none)
                sum_o m_io x_io <= budget_i            (memory)
                sum_o t_io x_io <= deadline            (round time, if a deadline is set)
                sum_io u_io x_io <= upload budget      (server ingress, if set: couples devices)

A device with no option inside its memory budget and the deadline is skipped before the program,
with the reason; one the program leaves out (upload budget) is reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


@dataclass(frozen=True)
class Option:
    """One candidate plan for a device, with the cost model's estimates."""

    rank: int
    batch: int
    bits: int
    share: float
    """Share of the chosen modules (the most important first) this device trains."""
    memory_mb: float
    time_s: float
    upload_mb: float
    value: float


@dataclass(frozen=True)
class Allocation:
    """A device's plan, or None with the reason it is skipped."""

    option: Option | None
    reason: str = ""


def option_value(importance: float, rank: int, fidelity: float, examples: float) -> float:
    """Importance-weighted adapter capacity times data: importance x rank x fidelity x examples."""
    return importance * rank * fidelity * examples


def _describe(o: Option) -> str:
    return f"rank {o.rank}, batch {o.batch}, {o.bits}-bit, modules x{o.share:g}"


def infeasible_reason(options: Sequence[Option], budget_mb: float, deadline_s: float) -> str:
    """Why no option fits (empty string when one does)."""
    if not options:
        return "no plan options"
    fits_mem = [o for o in options if o.memory_mb <= budget_mb]
    fits_time = [o for o in options if deadline_s <= 0 or o.time_s <= deadline_s]
    if not fits_mem:
        least = min(options, key=lambda o: o.memory_mb)
        return (
            f"memory budget {budget_mb:.0f} MB < {least.memory_mb:.0f} MB needed by the "
            f"smallest plan ({_describe(least)})"
        )
    if not fits_time:
        fastest = min(options, key=lambda o: o.time_s)
        return (
            f"deadline {deadline_s:.1f} s < {fastest.time_s:.1f} s estimated for the fastest "
            f"plan ({_describe(fastest)})"
        )
    if not any(deadline_s <= 0 or o.time_s <= deadline_s for o in fits_mem):
        return "no plan fits the memory budget and the deadline together"
    return ""


def fleet_limits(
    options: Mapping[int, Sequence[Option]],
    budgets_mb: Mapping[int, float],
    upload_share: float,
    straggler_deadline: bool,
) -> tuple[float, float]:
    """The round's (deadline s, upload MB) derived from the fleet, so the program is a joint one
    without hand-set numbers (0: that limit is off).

    Deadline: the slowest device's fastest plan within its memory, max_i min_o t_io: every
    device that fits can still take part, but none may run past what the straggler needs at
    its leanest (a faster device's slow, rich plans are cut first). Upload: `upload_share` of
    what every device would send at its largest plan, sum_i max_o u_io: the devices compete for
    the server's ingress, so ranks are traded between them by value."""
    fitting = {
        node: [o for o in menu if o.memory_mb <= budgets_mb[node]] for node, menu in options.items()
    }
    fitting = {node: menu for node, menu in fitting.items() if menu}
    if not fitting:
        return 0.0, 0.0
    deadline = (
        max(min(o.time_s for o in m) for m in fitting.values()) if straggler_deadline else 0.0
    )
    upload = upload_share * sum(max(o.upload_mb for o in m) for m in fitting.values())
    return deadline, upload


def allocate(
    options: Mapping[int, Sequence[Option]],
    budgets_mb: Mapping[int, float],
    deadline_s: float = 0.0,
    upload_mb: float = 0.0,
) -> dict[int, Allocation]:
    """Solve the program above for devices `options` (node -> menu); 0 disables a limit."""
    out: dict[int, Allocation] = {}
    nodes = []
    for node, menu in options.items():
        reason = infeasible_reason(menu, budgets_mb[node], deadline_s)
        if reason:
            out[node] = Allocation(None, reason)
        else:
            nodes.append(node)
    if not nodes:
        return out
    index = [(node, j) for node in nodes for j in range(len(options[node]))]
    opts = [options[node][j] for node, j in index]
    n, rows = len(index), []
    values = np.array([o.value for o in opts])
    one = np.zeros((len(nodes), n))
    mem = np.zeros((len(nodes), n))
    tim = np.zeros((len(nodes), n))
    row_of = {node: d for d, node in enumerate(nodes)}
    for k, (node, _) in enumerate(index):
        d = row_of[node]
        one[d, k], mem[d, k], tim[d, k] = 1.0, opts[k].memory_mb, opts[k].time_s
    rows.append(LinearConstraint(one, 0.0, 1.0))
    rows.append(LinearConstraint(mem, -np.inf, [budgets_mb[node] for node in nodes]))
    if deadline_s > 0:
        rows.append(LinearConstraint(tim, -np.inf, deadline_s))
    if upload_mb > 0:
        rows.append(LinearConstraint(np.array([[o.upload_mb for o in opts]]), -np.inf, upload_mb))
    res = milp(-values, constraints=rows, integrality=np.ones(n), bounds=Bounds(0.0, 1.0))
    if res.x is None:  # cannot happen with x = 0 feasible, but never crash a round on it
        raise RuntimeError(f"allocation program failed: {res.message}")
    chosen = np.round(res.x).astype(int)
    for node in nodes:
        picks = [opts[k] for k, (nd, _) in enumerate(index) if nd == node and chosen[k]]
        out[node] = (
            Allocation(picks[0])
            if picks
            else Allocation(None, f"left out: the upload budget of {upload_mb:g} MB is spent")
        )
    return out
