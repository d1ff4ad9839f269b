"""The server's model: the full model with the global adapter, the server's own data, its
training and evaluation, FedPipe's importance choice of adapter matrices, and the emulators it
builds, prices and packages for devices."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedpeat.config import (
    AdapterConfig,
    Config,
)
from fedpeat.cost import MiB, ModelShape, training_memory_bytes
from fedpeat.data import encode, server_data, server_train_data
from fedpeat.emulator import (
    Emulator,
    Package,
    adapter_region,
    build_emulator,
    layer_prefix,
    package,
    round_trip,
    select_layers,
    to_emulator_keys,
)
from fedpeat.full_ft import full_state, set_full_state, trainable_full_model
from fedpeat.importance import (
    candidate_modules,
    choose_modules,
    importance_scores,
    lora_params,
    top_share,
)
from fedpeat.lora import (
    AdapterState,
    attach_lora,
    get_adapter_state,
    lora_model,
    set_adapter_state,
)
from fedpeat.model import load_model, load_tokenizer, shape_of
from fedpeat.train import EvalResult, TrainResult, evaluate_ppl, local_train, resolve_device


class ServerModel:
    """The full model with the global adapter, the server's data, and the emulator factory."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.held_out = encode(server_data(cfg.data), self.tokenizer, cfg.data.max_length)
        if not self.held_out:
            raise ValueError("the server's held-out set is empty after tokenization")
        self.train_data = encode(server_train_data(cfg.data), self.tokenizer, cfg.data.max_length)
        self.base = load_model(cfg.model, self.device)
        n_layers = int(self.base.config.num_hidden_layers)
        e = cfg.emulator
        # Cases 1 and 2 put adapters on the adapter region only, so they exist in every emulator.
        self.adapter_layers = None if e.case == 3 else adapter_region(n_layers, e.bottom, e.top)
        self.scores: dict[str, float] = {}
        self.importance: dict[str, Any] = {}
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.model_bits = torch.finfo(getattr(torch, cfg.model.dtype)).bits
        self.adapter_cfg = self._global_adapter() if cfg.planner.enabled else cfg.adapter
        self.model = lora_model(cfg.model, self.adapter_cfg, self.device, self.adapter_layers)
        # Fresh LoRA: A random (seeded), B zero, so the plug-in starts equal to the base model.
        self.initial_state = initial_adapter_state(get_adapter_state(self.model), cfg.seed)
        self.full_ft = cfg.strategy.name == "fed_ft"
        if self.full_ft:  # the state is the whole model, starting from the base weights
            self.full = trainable_full_model(cfg.model, self.device)
            self.initial_state = full_state(self.full)
        self.adapter_params = int(sum(v.size for v in self.initial_state.values()))
        prefix = dict(self.base.named_modules())[layer_prefix(self.base, n_layers)]
        self._layer_params = [sum(p.numel() for p in layer.parameters()) for layer in prefix]
        self.full_shape = shape_of(self.base)  # the planner asks for shapes hundreds of times
        self._layer_linear = [
            sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
            for layer in prefix
        ]
        self._packages: dict[float, Package] = {}
        self.emulators: dict[float, Emulator] = {}

    # -- FedPipe: which matrices carry LoRA

    def _global_adapter(self) -> AdapterConfig:
        """The global adapter under the planner: rank `planner.server_rank` (same alpha / r
        scale), on the fixed `adapter.modules` or on the matrices importance chooses."""
        pl, a = self.cfg.planner, self.cfg.adapter
        candidates = candidate_modules(self.base, pl.candidates, self.adapter_layers)
        self.module_shapes = {n: (m.out_features, m.in_features) for n, m in candidates.items()}
        calibration = self.train_data or self.held_out
        self.scores = importance_scores(
            self.base,
            candidates,
            calibration,
            self.cfg.train.batch_size,
            pl.calibration_batches,
            self.pad_id,
            self.device,
        )
        costs = {n: lora_params(self.module_shapes, [n], pl.server_rank) for n in candidates}
        budget = pl.budget_fraction * sum(costs.values())
        if a.modules:
            unknown = [m for m in a.modules if m not in candidates]
            if unknown:
                raise ValueError(
                    f"adapter.modules {unknown[:3]} are not candidate matrices in the adapter "
                    f"layers {self.adapter_layers}; e.g. {next(iter(candidates))}"
                )
            chosen, how = list(a.modules), "fixed by adapter.modules"
        else:
            chosen, how = choose_modules(self.scores, costs, budget), "importance"
        self.importance = {
            "method": "mean over calibration batches of sum |W * dL/dW|",
            "calibration_batches": pl.calibration_batches,
            "server_rank": pl.server_rank,
            "budget_params": budget,
            "chosen_params": sum(costs[m] for m in chosen),
            "choice": how,
            "chosen": chosen,
            "scores": dict(sorted(self.scores.items(), key=lambda kv: -kv[1])),
        }
        scale = a.alpha / a.r
        return replace(a, r=pl.server_rank, alpha=scale * pl.server_rank, modules=chosen)

    def device_adapter(self, rank: int, share: float) -> AdapterConfig:
        """A device's adapter: the most important `share` of the global modules at `rank`, with
        the global alpha / r scale (so truncations and aggregates need no rescaling)."""
        g = self.adapter_cfg
        modules = top_share(self.scores, g.modules, share)
        return replace(g, r=rank, alpha=g.alpha / g.r * rank, modules=modules)

    def adapter_params_of(self, adapter: AdapterConfig) -> int:
        """LoRA parameters of `adapter` (explicit modules) on this model."""
        return lora_params(self.module_shapes, adapter.modules, adapter.r)

    # -- evaluation and training on the full model

    def _load(self, state: AdapterState) -> torch.nn.Module:
        """The full model carrying `state` (the adapter, or under fed_ft every weight)."""
        if self.full_ft:
            set_full_state(self.full, state)
            return self.full
        set_adapter_state(self.model, state)
        return self.model

    def evaluate(self, state: AdapterState) -> EvalResult:
        model = self._load(state)
        return evaluate_ppl(
            model, self.held_out, self.cfg.train.eval_batch_size, self.pad_id, self.device
        )

    def train(
        self, state: AdapterState, server_round: int
    ) -> tuple[AdapterState, TrainResult, int]:
        """The server's own local update on the full model (collaborative tuning)."""
        if not self.train_data:
            raise ValueError("the server has no training data (data.server_train_fraction=0)")
        model = self._load(state)
        seed = self.cfg.seed + 1000 * server_round + 999_983  # distinct from every device's seed
        result = local_train(model, self.train_data, self.cfg.train, seed, self.pad_id, self.device)
        new = full_state(self.full) if self.full_ft else get_adapter_state(self.model)
        return new, result, len(self.train_data)

    # -- emulators

    def emulator(self, level: float) -> Emulator:
        """The emulator at keep ratio `level`, built (and distilled if configured) once."""
        if level not in self.emulators:
            e = self.cfg.emulator
            wire = getattr(torch, e.wire_dtype)
            emulator = build_emulator(self.base, level, e.bottom, e.top, wire)
            if e.distill.enabled and len(emulator.layers) < emulator.n_full_layers:
                from fedpeat.distill import distill

                distill(emulator, self.base, self.train_data, e.distill, self.pad_id, self.device)
                emulator.distilled = True
                round_trip(emulator.model, wire)
            self.emulators[level] = emulator
        return self.emulators[level]

    def package(self, level: float) -> Package:
        if level not in self._packages:
            self._packages[level] = package(
                self.emulator(level), getattr(torch, self.cfg.emulator.wire_dtype)
            )
        return self._packages[level]

    def package_digests(self) -> dict[float, str]:
        """Level -> digest of every emulator package built so far."""
        return {level: pkg.digest for level, pkg in self._packages.items()}

    def emulator_shape(self, level: float | None) -> ModelShape:
        """Shape of the emulator at `level` (None: the full model) without building it."""
        full = self.full_shape
        if level is None:
            return full
        e = self.cfg.emulator
        kept = set(select_layers(full.layers, e.bottom, e.top, level))
        dropped = sum(n for i, n in enumerate(self._layer_params) if i not in kept)
        dropped_linear = sum(n for i, n in enumerate(self._layer_linear) if i not in kept)
        return replace(
            full,
            params=full.params - dropped,
            layers=len(kept),
            linear_params=full.linear_params - dropped_linear,
        )

    def memory_need_mb(
        self,
        level: float | None,
        bits: int = 0,
        batch: int = 0,
        adapter_params: int | None = None,
        compute_bits: int | None = None,
    ) -> float:
        """Estimated training memory of one step on the emulator at `level` (None: full model)
        with frozen weights at `bits` (0: the model dtype), `batch` (0: train.batch_size),
        `adapter_params` (None: the global adapter's) and activations and unquantized weights
        at `compute_bits` (None: 16 for bits=16, else the model's); plus planner.runtime_mb."""
        shape = self.emulator_shape(level)
        model_bits = torch.finfo(getattr(torch, self.cfg.model.dtype)).bits
        bits = bits or model_bits
        if compute_bits is None:
            compute_bits = 16 if bits == 16 else model_bits
        need = training_memory_bytes(
            shape,
            self.adapter_params if adapter_params is None else adapter_params,
            batch or self.cfg.train.batch_size,
            self.cfg.data.max_length,
            bits,
            act_bytes=compute_bits // 8,
            compute_bits=compute_bits,
        )
        return need / MiB + self.cfg.planner.runtime_mb

    def emulator_ppl(self, level: float, state: AdapterState | None = None) -> EvalResult:
        """Perplexity of the emulator (+ adapter `state`) on the server's held-out data."""
        emulator = self.emulator(level)
        model: torch.nn.Module = emulator.model
        if state is not None:
            model = attach_lora(emulator.model, self.cfg.adapter, layers=emulator.adapter_layers)
            set_adapter_state(model, to_emulator_keys(state, emulator.layers))
        try:
            return evaluate_ppl(
                model, self.held_out, self.cfg.train.eval_batch_size, self.pad_id, self.device
            )
        finally:
            if isinstance(model, PeftModel):
                model.unload()

    def save_merged(self, state: AdapterState, directory: str) -> None:
        """Write the full model with `state` merged into its weights, plus the tokenizer: a
        plain transformers model (no PEFT needed, and no adapter cost in the forward pass).
        Under fed_ft: the fine-tuned model itself."""
        if self.full_ft:
            set_full_state(self.full, state)
            self.full.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            return
        base = load_model(self.cfg.model, self.device, cached=False)
        peft_model = attach_lora(base, self.adapter_cfg, layers=self.adapter_layers)
        set_adapter_state(peft_model, state)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_adapter(self, state: AdapterState, directory: str, base_location: str) -> None:
        """Write a standard PEFT adapter directory for `state`."""
        set_adapter_state(self.model, state)
        self.model.peft_config["default"].base_model_name_or_path = base_location
        self.model.save_pretrained(directory)


def initial_adapter_state(template: AdapterState, seed: int) -> AdapterState:
    """A from `seed` with PEFT's Kaiming-uniform bound 1/sqrt(fan_in), B zero."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in template.items():
        if "lora_A" in key:
            bound = 1.0 / np.sqrt(value.shape[1])
            out[key] = rng.uniform(-bound, bound, value.shape).astype(np.float32)
        else:
            out[key] = np.zeros_like(value)
    return out
