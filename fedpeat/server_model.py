"""The server's model: the full model with the global adapter, the server's own data, its
training and evaluation, FedPipe's importance choice of adapter matrices, and the emulators it
builds, prices and packages for devices."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedpeat.config import AdapterConfig, Config
from fedpeat.cost import MiB, ModelShape, load_memory_bytes, training_memory_bytes
from fedpeat.data import encode, eval_prompts, server_data, server_train_data
from fedpeat.emulator import (
    Emulator,
    Package,
    global_adapter_layers,
    keys_on_layers,
    layer_prefix,
    local_adapter_layers,
    package,
    select_layers,
    shared_emulator,
    to_emulator_keys,
    to_emulator_modules,
)
from fedpeat.emulator_cache import load_cached, model_digest
from fedpeat.full_ft import full_state, set_full_state, trainable_full_model
from fedpeat.importance import (
    block_influence,
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
    initial_adapter_state,
    merged_state,
    set_adapter_state,
)
from fedpeat.metrics import Scored, bootstrap, score
from fedpeat.model import cache_dir, load_model, load_tokenizer, shape_of, sharing_twin
from fedpeat.train import (
    EvalResult,
    TrainResult,
    evaluate_ppl,
    generate_greedy,
    local_train,
    resolve_device,
)

log = logging.getLogger(__name__)

DISTILL_VERSION = 2
"""Bumped whenever the distillation code changes what it produces: old cache entries miss."""


class ServerModel:
    """The full model with the global adapter, the server's data, and the emulator factory."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        # Validation decides (best round, the controller's reward, retention); test reports.
        self.held_out = encode(server_data(cfg.data), self.tokenizer, cfg.data.max_length)
        test_rows = cfg.eval.test_samples or cfg.data.server_eval_samples
        self.test_set = encode(
            server_data(replace(cfg.data, server_eval_samples=test_rows), "test"),
            self.tokenizer,
            cfg.data.max_length,
        )
        if not self.held_out or not self.test_set:
            raise ValueError("the server's validation or test set is empty after tokenization")
        n_prompts = cfg.eval.prompts
        self.prompts = {
            split: eval_prompts(cfg.data, split, n_prompts) if cfg.eval.metrics else []
            for split in ("validation", "test")
        }
        self.train_data = encode(server_train_data(cfg.data), self.tokenizer, cfg.data.max_length)
        self.base = load_model(cfg.model, self.device)
        n_layers = int(self.base.config.num_hidden_layers)
        e = cfg.emulator
        self.layer_scores: list[float] | None = None
        if e.case != 3 and e.layer_choice == "importance":
            args = (cfg.train.batch_size, cfg.planner.calibration_batches, self.pad_id, self.device)
            self.layer_scores = block_influence(self.base, self.train_data or self.held_out, *args)
        # Cases 1 and 2: the adapter region (in every emulator) or, `emulator.adapt=held`,
        # every layer some level holds; a device then trains the part its emulator holds.
        self.adapter_layers = (
            None
            if e.case == 3
            else global_adapter_layers(
                n_layers, e.bottom, e.top, e.adapt, self.device_levels(), self.layer_scores
            )
        )
        self.partial_adapters = e.case != 3 and e.adapt == "held"
        self.scores: dict[str, float] = {}
        self.importance: dict[str, Any] = {}
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.model_bits = torch.finfo(getattr(torch, cfg.model.dtype)).bits
        self.adapter_cfg = self._global_adapter() if cfg.planner.enabled else cfg.adapter
        # The plug-in model wraps the base's own tensors (no second copy of the weights).
        self.model = attach_lora(
            sharing_twin(self.base), self.adapter_cfg, layers=self.adapter_layers
        )
        if cfg.strategy.server_checkpointing:  # the twin's flag: emulators train as they are
            plain: Any = self.model.get_base_model()
            plain.gradient_checkpointing_enable({"use_reentrant": False})
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
        self._refs: dict[float, tuple[Package, int]] = {}
        self.emulators: dict[float, Emulator] = {}
        self._digests: tuple[str, str] | None = None
        self.check_protection()

    def device_levels(self) -> list[float]:
        """The keep ratios a device may receive (case 2's shared level included)."""
        e = self.cfg.emulator
        return sorted({*e.levels, e.shared_level} if e.case == 2 else set(e.levels))

    def device_adapter_state(self, state: AdapterState, level: float) -> AdapterState:
        """What a device training the emulator at `level` receives of the global adapter: all
        of it, or under `emulator.adapt=held` the layers that emulator holds."""
        if not self.partial_adapters:
            return state
        e = self.cfg.emulator
        held = select_layers(self.full_shape.layers, e.bottom, e.top, level, self.layer_scores)
        return keys_on_layers(state, held)

    def check_protection(self) -> None:
        """Cases 1 and 2: every emulator a device may receive holds at most
        `emulator.max_layer_share` of the decoder layers (adapter region included)."""
        e = self.cfg.emulator
        if e.case == 3:
            return
        n = self.full_shape.layers
        for level in self.device_levels():
            held = len(select_layers(n, e.bottom, e.top, level, self.layer_scores))
            if held > e.max_layer_share * n or held == n:
                raise ValueError(
                    f"emulator.levels: keep ratio {level} with emulator.bottom={e.bottom} and "
                    f"emulator.top={e.top} holds {held} of the model's {n} decoder layers, above "
                    f"emulator.max_layer_share={e.max_layer_share} ({int(e.max_layer_share * n)} "
                    "layers): lower the level or the adapter region"
                )

    # -- FedPipe: which matrices carry LoRA

    def _global_adapter(self) -> AdapterConfig:
        """The global adapter under the planner: rank `planner.server_rank` (same alpha / r
        scale), on the fixed `adapter.modules` or on the matrices importance chooses."""
        pl, a = self.cfg.planner, self.cfg.adapter
        candidates = candidate_modules(self.base, pl.candidates, self.adapter_layers)
        self.module_shapes = {n: (m.out_features, m.in_features) for n, m in candidates.items()}
        calibration = self.train_data or self.held_out
        # On a twin of the base (same tensors: the candidates' weights get their gradients),
        # recomputing activations as the server's training does.
        twin = sharing_twin(self.base)
        if self.cfg.strategy.server_checkpointing:
            twin.gradient_checkpointing_enable({"use_reentrant": False})
        t = self.cfg.train
        args = (t.batch_size, pl.calibration_batches, self.pad_id, self.device, t.loss_chunk)
        self.scores = importance_scores(twin, candidates, calibration, *args)
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

    def _load(self, state: AdapterState) -> torch.nn.Module:
        """The full model carrying `state` (the adapter, or under fed_ft every weight)."""
        if self.full_ft:
            set_full_state(self.full, state)
            return self.full
        set_adapter_state(self.model, state)
        return self.model

    def _split(self, split: str) -> list[Any]:
        return self.held_out if split == "validation" else self.test_set

    def _ppl(self, model: torch.nn.Module, split: str) -> EvalResult:
        t, data = self.cfg.train, self._split(split)
        return evaluate_ppl(model, data, t.eval_batch_size, self.pad_id, self.device, t.loss_chunk)

    def evaluate(self, state: AdapterState, split: str = "validation") -> EvalResult:
        return self._ppl(self._load(state), split)

    def generate(self, model: torch.nn.Module, prompts: list[str]) -> list[str]:
        """Greedy generations of `model` for `prompts` (text), decoded and stripped."""
        ev = self.cfg.eval
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.tokenizer.eos_token_id
        out = generate_greedy(
            model, ids, ev.max_new_tokens, ev.batch_size, self.pad_id, eos, self.device
        )
        texts = [str(self.tokenizer.decode(o, skip_special_tokens=True)).strip() for o in out]
        return [t.split("\n")[0].strip() for t in texts] if ev.first_line else texts

    def task_scores(
        self, state: AdapterState, split: str = "validation", level: float | None = None
    ) -> Scored | None:
        """Task metrics (`eval.metrics`) of the plug-in model carrying `state`, or of the
        emulator at `level` carrying it; None when no task metric is configured."""
        items = self.prompts[split]
        if not items:
            return None
        prompts = [p for p, _ in items]
        if level is None:
            hyps = self.generate(self._load(state), prompts)
        else:
            with self._emulator_with(level, state) as model:
                hyps = self.generate(model, prompts)
        return score(hyps, [refs for _, refs in items], self.cfg.eval.metrics)

    def report(self, state: AdapterState, split: str, level: float | None = None) -> dict[str, Any]:
        """Perplexity and task metrics of the plug-in (or the emulator at `level`) on `split`,
        each with a bootstrap 95% interval over samples / prompts (`eval.bootstrap`)."""
        ev = self.cfg.eval
        if level is None:
            ppl = self.evaluate(state, split)
        else:
            ppl = self.emulator_ppl(level, state, split)
        out: dict[str, Any] = {"ppl": ppl.ppl, "samples": len(ppl.sample_nll)}
        if ev.bootstrap:
            out["ppl_ci"] = bootstrap(ppl.ppl_of, len(ppl.sample_nll), ev.bootstrap, self.cfg.seed)
        scored = self.task_scores(state, split, level)
        if scored is not None:
            out["prompts"] = scored.n
            for metric in self.cfg.eval.metrics:
                out[metric] = scored.value(metric)
                if ev.bootstrap:
                    out[f"{metric}_ci"] = bootstrap(
                        partial(scored.value, metric), scored.n, ev.bootstrap, self.cfg.seed
                    )
        return out

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

    def align(self, state: AdapterState, level: float) -> tuple[AdapterState, dict[str, Any]]:
        """Knowledge back (`emulator.align`): the plug-in carrying `state` learns to imitate the
        emulator at `level` carrying it, on the server's inputs (never its labels)."""
        from fedpeat.distill import align, align_inputs

        a, began, n = self.cfg.emulator.align, time.perf_counter(), self.cfg.data.max_length
        inputs = align_inputs(server_train_data(self.cfg.data), self.tokenizer, n, a.samples)
        with self._emulator_with(level, state) as teacher:
            eos, student = self.tokenizer.eos_token_id, self._load(state)
            losses, used = align(teacher, student, inputs, a, n, self.pad_id, eos, self.device)
        info = {"level": level, "steps": a.steps, "sequences": used, "loss_first": losses[0]}
        info |= {"loss_last": losses[-1], "s": time.perf_counter() - began}
        return get_adapter_state(self.model), info

    # -- emulators

    def emulator(self, level: float) -> Emulator:
        """The emulator at keep ratio `level`, a view of the base model (`shared_emulator`) whose
        own tensors are its middle layers; distilled ones come from the disk cache when this
        model, level, layer choice, recipe and data were distilled before. One is resident at
        a time (the server's memory stays at the base model plus one emulator's middle)."""
        if level not in self.emulators:
            self._evict()  # before building: never two middles at once
            e = self.cfg.emulator
            wire = getattr(torch, e.wire_dtype)
            emulator = shared_emulator(self.base, level, e.bottom, e.top, wire, self.layer_scores)
            if e.distill.enabled and len(emulator.layers) < emulator.n_full_layers:
                self._distilled(emulator, wire)
            self.emulators[level] = emulator
        return self.emulators[level]

    def _evict(self) -> None:
        """Drop the resident emulator (its module tree's reference cycles collected now)."""
        if self.emulators:
            self.emulators.clear()
            gc.collect()

    def distill_file(self, layers: list[int]) -> tuple[Path, str]:
        """The cache file of the emulator distilled on `layers`, and its derivation key: what
        it derives from (the model's weights, the layers, the recipe, the wire dtype and the
        distillation data's token ids)."""
        if not self._digests:  # the weights' and the data's: hashed once (packages ask each round)
            ids = json.dumps([[d.input_ids, d.labels] for d in self.train_data]).encode()
            self._digests = (model_digest(self.base), hashlib.sha256(ids).hexdigest())
        model, data = self._digests
        e = self.cfg.emulator
        recipe = {
            "model": model,
            "layers": layers,
            "bottom": e.bottom,
            "top": e.top,
            "distill": asdict(e.distill),
            "wire": e.wire_dtype,
            "data": data,
            "version": DISTILL_VERSION,
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        return cache_dir() / "emulators" / f"{key[:32]}.safetensors", key

    def _distilled(self, emulator: Emulator, wire: torch.dtype) -> None:
        """Distil `emulator`'s middle layers in place, or load them from the disk cache."""
        from fedpeat.distill import distilled_in_place

        path, key = self.distill_file(emulator.layers)
        args = (self.base, self.train_data, self.cfg.emulator.distill, self.pad_id, self.device)
        distilled_in_place(emulator, *args, wire, path, key)

    def package(self, level: float) -> Package:
        """The wire package at `level`, with its tensors, for the caller to send and drop (the
        server keeps none); `package_ref` answers everything else."""
        e, pkg, n = self.cfg.emulator, None, self.full_shape.layers
        layers = select_layers(n, e.bottom, e.top, level, self.layer_scores)
        cached = self.distill_file(layers) if e.distill.enabled and len(layers) < n else None
        if cached and cached[0].is_file():
            self._evict()  # a distilled emulator's cache file is its package: read it alone
            pkg = load_cached(*cached)
        pkg = pkg or package(self.emulator(level), getattr(torch, e.wire_dtype))
        self._refs[level] = (replace(pkg, state={}), pkg.nbytes)
        return pkg

    def package_ref(self, level: float) -> tuple[Package, int]:
        """The package at `level` without its tensors (digest, layer map, config) and its size
        in bytes: what planning, pricing and plans need, remembered for every level built."""
        if level not in self._refs:
            self.package(level)
        return self._refs[level]

    def package_digests(self) -> dict[float, str]:
        """Level -> digest of every emulator package built so far."""
        return {level: ref.digest for level, (ref, _) in self._refs.items()}

    def emulator_shape(self, level: float | None) -> ModelShape:
        """Shape of the emulator at `level` (None: the full model) without building it."""
        full = self.full_shape
        if level is None:
            return full
        e = self.cfg.emulator
        kept = set(select_layers(full.layers, e.bottom, e.top, level, self.layer_scores))
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
        if adapter_params is None and level is not None and self.partial_adapters:
            # Under `emulator.adapt=held` a device trains only its emulator's layers' part.
            part = self.device_adapter_state(self.initial_state, level)
            adapter_params = int(sum(v.size for v in part.values()))
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
            loss_chunk=self.cfg.train.loss_chunk,
        )
        if level is not None:  # a device loads its emulator first, which can peak higher
            need = max(need, load_memory_bytes(shape, compute_bits))
        return need / MiB + self.cfg.planner.runtime_mb

    @contextmanager
    def _emulator_with(self, level: float, state: AdapterState | None) -> Iterator[Any]:
        """The emulator at `level`, carrying `state` (full-model keys) while in the block."""
        emulator = self.emulator(level)
        model: torch.nn.Module = emulator.model
        if state is not None:
            adapter = self.adapter_cfg
            if adapter.modules:  # explicit matrices carry full-model indices: this emulator's
                adapter = replace(
                    adapter, modules=to_emulator_modules(adapter.modules, emulator.layers)
                )
            layers = local_adapter_layers(emulator.layers, self.adapter_layers or [])
            model = attach_lora(emulator.model, adapter, layers=layers)
            set_adapter_state(
                model, to_emulator_keys(keys_on_layers(state, emulator.layers), emulator.layers)
            )
        try:
            yield model
        finally:
            if isinstance(model, PeftModel):
                model.unload()

    def emulator_ppl(
        self, level: float, state: AdapterState | None = None, split: str = "validation"
    ) -> EvalResult:
        """Perplexity of the emulator (+ adapter `state`) on the server's held-out data."""
        with self._emulator_with(level, state) as model:
            return self._ppl(model, split)

    def save_merged(self, state: AdapterState, directory: str) -> None:
        """Write the full model with `state` merged into its weights, plus the tokenizer: a
        plain transformers model (no PEFT needed, and no adapter cost in the forward pass).
        Under fed_ft: the fine-tuned model itself."""
        if self.full_ft:
            set_full_state(self.full, state)
            self.full.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
            return
        set_adapter_state(self.model, state)  # merged matrix by matrix, the rest the base's
        # Saved through a twin: save_pretrained writes into the config it saves (architectures,
        # dtype), and the base's config must stay as emulators were cut from it (their digest).
        sharing_twin(self.base).save_pretrained(directory, state_dict=merged_state(self.model))
        self.tokenizer.save_pretrained(directory)

    def save_adapter(self, state: AdapterState, directory: str, base_location: str) -> None:
        """Write a standard PEFT adapter directory for `state`."""
        set_adapter_state(self.model, state)
        self.model.peft_config["default"].base_model_name_or_path = base_location
        self.model.save_pretrained(directory)
