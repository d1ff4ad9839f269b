"""What one device does in a round, and what the server evaluates: the ML side of the app.

The server sends each device a `Plan` (the resolved config sections it needs); the device never
composes config itself. Everything here is plain Python + torch, callable without Flower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpeat.config import (
    AdapterConfig,
    Config,
    DataConfig,
    ModelConfig,
    PartitionConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from fedpeat.data import Encoded, device_data, encode, server_data
from fedpeat.lora import AdapterState, get_adapter_state, lora_model, set_adapter_state
from fedpeat.model import load_tokenizer, resolve_device
from fedpeat.train import EvalResult, TrainResult, evaluate_ppl, local_train


@dataclass
class Plan:
    """Everything a device needs for one round, built by the server."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 42
    server_round: int = 0

    @classmethod
    def from_config(cls, cfg: Config, server_round: int) -> Plan:
        return cls(
            cfg.model, cfg.data, cfg.partition, cfg.adapter, cfg.train, cfg.seed, server_round
        )

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return from_dict(cls, json.loads(text))


_ENCODED: dict[str, tuple[list[Encoded], list[Encoded]]] = {}


def device_encoded(
    plan: Plan, partition_id: int, num_partitions: int
) -> tuple[list[Encoded], list[Encoded]]:
    """Tokenized (train, held-out) data of one device, cached per process."""
    key = json.dumps(
        [
            to_dict(plan.model),
            to_dict(plan.data),
            to_dict(plan.partition),
            partition_id,
            num_partitions,
        ],
        sort_keys=True,
    )
    if key not in _ENCODED:
        tok = load_tokenizer(plan.model)
        split = device_data(plan.data, plan.partition, partition_id, num_partitions)
        test = split.test[: plan.data.device_eval_samples]
        _ENCODED[key] = (
            encode(split.train, tok, plan.data.max_length),
            encode(test, tok, plan.data.max_length),
        )
    return _ENCODED[key]


def device_train(
    plan: Plan, partition_id: int, num_partitions: int, state: AdapterState
) -> tuple[AdapterState, TrainResult, int]:
    """Train the global adapter `state` locally; return (new state, figures, train set size)."""
    device = resolve_device(plan.train.device)
    train_data, _ = device_encoded(plan, partition_id, num_partitions)
    model = lora_model(plan.model, plan.adapter, device)
    set_adapter_state(model, state)
    pad_id = int(load_tokenizer(plan.model).pad_token_id)
    # Per-device, per-round seed: devices draw different batches, reruns draw the same ones.
    seed = plan.seed + 1000 * plan.server_round + partition_id
    result = local_train(model, train_data, plan.train, seed, pad_id, device)
    return get_adapter_state(model), result, len(train_data)


def device_evaluate(
    plan: Plan, partition_id: int, num_partitions: int, state: AdapterState
) -> tuple[EvalResult, int]:
    """Perplexity of base + `state` on the device's held-out split."""
    device = resolve_device(plan.train.device)
    _, test_data = device_encoded(plan, partition_id, num_partitions)
    model = lora_model(plan.model, plan.adapter, device)
    set_adapter_state(model, state)
    pad_id = int(load_tokenizer(plan.model).pad_token_id)
    return evaluate_ppl(model, test_data, plan.train.eval_batch_size, pad_id, device), len(
        test_data
    )


class ServerModel:
    """The full model with the global adapter, and the server's own held-out data."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.tokenizer = load_tokenizer(cfg.model)
        self.held_out = encode(server_data(cfg.data), self.tokenizer, cfg.data.max_length)
        if not self.held_out:
            raise ValueError("the server's held-out set is empty after tokenization")
        self.model = lora_model(cfg.model, cfg.adapter, self.device)
        # Fresh LoRA: A random (seeded), B zero, so the plug-in starts equal to the base model.
        self.initial_state = get_adapter_state(self.model)
        self._seed_initial_state(cfg.seed)

    def _seed_initial_state(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for key, value in self.initial_state.items():
            if "lora_A" in key:
                # Kaiming-uniform bound as PEFT uses for A, drawn from our seed so runs repeat.
                bound = 1.0 / np.sqrt(value.shape[1])
                self.initial_state[key] = rng.uniform(-bound, bound, value.shape).astype(np.float32)
            else:
                self.initial_state[key] = np.zeros_like(value)

    def evaluate(self, state: AdapterState) -> EvalResult:
        set_adapter_state(self.model, state)
        pad_id = int(self.tokenizer.pad_token_id)
        return evaluate_ppl(
            self.model, self.held_out, self.cfg.train.eval_batch_size, pad_id, self.device
        )

    def save_adapter(self, state: AdapterState, directory: str, base_location: str) -> None:
        """Write a standard PEFT adapter directory for `state`."""
        set_adapter_state(self.model, state)
        self.model.peft_config["default"].base_model_name_or_path = base_location
        self.model.save_pretrained(directory)


def metrics_of(result: TrainResult | EvalResult) -> dict[str, Any]:
    return {k: v for k, v in vars(result).items()}
