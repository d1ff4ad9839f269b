"""Cost model: pure functions of model shape and plan, units in their names and docstrings.

Memory of one local LoRA training step (the level chooser and, later, the planner use it):

  frozen weights      n_frozen * bits / 8
  adapter             n_adapter * 4 bytes * 4   (fp32 weights, grads, Adam m and v)
  activations         layers * b * s * h * (34 + 5 * a * s / h) * act_bytes / 2
                      (Korthikanti et al. 2022, per transformer layer, which counts 16-bit
                      activations; we scale by act_bytes / 2 for the compute dtype)
  logits              3 * b * s * vocab * 4 bytes  (fp32 logits, log-softmax and its gradient)
  runtime             a fixed allowance for the framework (weights of other processes are not
                      counted; it is a per-process figure)

With LoRA the backward pass runs through every layer above the lowest adapter, so all layers'
activations are kept: activations scale with the emulator's depth.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a (possibly layer-dropped) model."""

    params: int
    """All parameters (embedding counted once when tied)."""
    layers: int
    hidden: int
    heads: int
    vocab: int


def activation_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: int = 4) -> float:
    """Stored activations of one training step, all layers, in bytes."""
    per_layer = batch * seq * shape.hidden * (34 + 5 * shape.heads * seq / shape.hidden)
    return shape.layers * per_layer * act_bytes / 2


def logits_bytes(shape: ModelShape, batch: int, seq: int) -> float:
    """fp32 logits, their log-softmax and its gradient."""
    return 3.0 * batch * seq * shape.vocab * 4


def training_memory_bytes(
    shape: ModelShape,
    adapter_params: int,
    batch: int,
    seq: int,
    bits: int = 32,
    act_bytes: int = 4,
    runtime_bytes: float = 0.0,
) -> float:
    """Estimated peak bytes of one LoRA training step (see the module docstring)."""
    weights = shape.params * bits / 8
    adapter = adapter_params * 4 * 4
    return (
        weights
        + adapter
        + activation_bytes(shape, batch, seq, act_bytes)
        + logits_bytes(shape, batch, seq)
        + runtime_bytes
    )


def choose_level(
    levels: list[float], need_bytes: dict[float, float], budget_bytes: float
) -> float | None:
    """The highest keep ratio whose estimated need fits the budget, or None if none fits."""
    fitting = [lv for lv in levels if need_bytes[lv] <= budget_bytes]
    return max(fitting) if fitting else None
