"""Model loading, LoRA state helpers, local training and perplexity on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpeat.config import AdapterConfig, ModelConfig
from fedpeat.data import collate, encode
from fedpeat.lora import (
    AdapterStateError,
    attach_lora,
    check_adapter_state,
    get_adapter_state,
    set_adapter_state,
)
from fedpeat.model import ModelNotFoundError, load_model, model_location
from fedpeat.train import evaluate_ppl, local_train

CPU = torch.device("cpu")


@pytest.fixture()
def lora(tiny_cfg):
    base = load_model(tiny_cfg.model, cached=False)
    return attach_lora(base, tiny_cfg.adapter, seed=0)


@pytest.fixture()
def data(tokenizer):
    texts = ["ROMEO:\nBut soft, what light through yonder window breaks?"] * 4
    return encode([{"prompt": "", "response": t} for t in texts], tokenizer, 32)


def test_tiny_model_is_deterministic(tiny_cfg) -> None:
    a = load_model(tiny_cfg.model, cached=False)
    b = load_model(tiny_cfg.model, cached=False)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert a.config.num_hidden_layers == tiny_cfg.model.tiny.num_layers
    assert not any(p.requires_grad for p in a.parameters())


def test_missing_models_name_what_was_tried(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="package 'no_such_pkg'.*not installed"):
        model_location(ModelConfig(source="gguf", package="no_such_pkg"))
    with pytest.raises(ModelNotFoundError, match="no 'absent.gguf'"):
        model_location(ModelConfig(source="gguf", gguf_file="absent.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(ModelConfig(source="hf", path=str(tmp_path / "empty")))
    with pytest.raises(ModelNotFoundError, match="tried 'nobody/nothing-here'"):
        load_model(ModelConfig(source="hf", path="nobody/nothing-here"))


def test_hf_source_loads_a_local_directory(tiny_cfg, tokenizer, tmp_path) -> None:
    tiny = load_model(tiny_cfg.model, cached=False)
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(name="mine", source="hf", path=str(tmp_path)), cached=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tiny(ids).logits)


def test_lora_starts_as_a_no_op_and_state_round_trips(tiny_cfg, lora) -> None:
    state = get_adapter_state(lora)
    layers, modules = tiny_cfg.model.tiny.num_layers, len(tiny_cfg.adapter.target_modules)
    assert len(state) == 2 * layers * modules
    assert all(v.dtype == np.float32 for v in state.values())
    assert all(not v.any() for k, v in state.items() if "lora_B" in k)
    changed = {k: v + 1.0 for k, v in state.items()}
    set_adapter_state(lora, changed)
    again = get_adapter_state(lora)
    for k in state:
        np.testing.assert_allclose(again[k], changed[k])


def test_check_adapter_state_rejects_bad_states() -> None:
    expected = {"a": (2, 3)}
    check_adapter_state(expected, {"a": np.zeros((2, 3))})
    with pytest.raises(AdapterStateError, match="1 missing"):
        check_adapter_state(expected, {})
    with pytest.raises(AdapterStateError, match="1 unexpected"):
        check_adapter_state(expected, {"a": np.zeros((2, 3)), "b": np.zeros(1)})
    with pytest.raises(AdapterStateError, match=r"shape \(3, 2\)"):
        check_adapter_state(expected, {"a": np.zeros((3, 2))})
    with pytest.raises(AdapterStateError, match="non-finite"):
        check_adapter_state(expected, {"a": np.full((2, 3), np.nan)})


def test_unknown_target_module_is_named(tiny_cfg) -> None:
    base = load_model(tiny_cfg.model, cached=False)
    with pytest.raises(AdapterStateError, match=r"\['c_attn'\] are not modules"):
        attach_lora(base, AdapterConfig(target_modules=["c_attn"]))


def test_local_training_lowers_the_loss_and_touches_only_the_adapter(
    tiny_cfg, lora, data, tokenizer
) -> None:
    base_before = {k: v.clone() for k, v in lora.named_parameters() if "lora_" not in k}
    before = evaluate_ppl(lora, data, 4, tokenizer.pad_token_id, CPU)
    result = local_train(
        lora, data, replace(tiny_cfg.train, local_steps=8, lr=1e-2), 0, tokenizer.pad_token_id, CPU
    )
    after = evaluate_ppl(lora, data, 4, tokenizer.pad_token_id, CPU)
    assert after.loss < before.loss - 0.1
    assert (
        result.steps == 8 and result.examples == 32 and result.tokens > 0 and result.peak_mem_mb > 0
    )
    for k, v in lora.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k


def test_perplexity_matches_a_hand_computation(lora, data, tokenizer) -> None:
    res = evaluate_ppl(lora, data, 3, tokenizer.pad_token_id, CPU)
    batch = collate(data, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert res.tokens == int(mask.sum())
    assert res.loss == pytest.approx(float(nll.mean()), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


@pytest.mark.slow
def test_embedded_smollm2_converts_once_to_an_equivalent_safetensors_cache() -> None:
    from transformers import AutoModelForCausalLM

    from fedpeat.config import compose
    from fedpeat.model import find_package_file, gguf_directory

    cfg = compose().model
    directory = gguf_directory(cfg)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert gguf_directory(cfg) == directory  # second call: the cache, no new conversion
    model = load_model(cfg, cached=False)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    gguf = find_package_file(cfg.package, cfg.gguf_file)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    ids = torch.tensor([[1, 510, 2318, 28, 905, 314]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_a_frozen_residual_makes_a_low_rank_device_compute_the_global_adapter(tiny_cfg) -> None:
    from fedpeat.lora import frozen_residual
    from strategies.aggregation import residual_state, truncate_state

    # A rank-4 "global" adapter with non-zero B; a rank-2 device gets its truncation, and with
    # the residual hooked in its outputs are the global model's. Same alpha / r on both.
    scale = tiny_cfg.adapter.alpha / tiny_cfg.adapter.r
    big = attach_lora(
        load_model(tiny_cfg.model, cached=False), replace(tiny_cfg.adapter, r=4, alpha=4 * scale)
    )
    rng = np.random.default_rng(0)
    state = {
        k: rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in get_adapter_state(big).items()
    }
    set_adapter_state(big, state)
    small = attach_lora(
        load_model(tiny_cfg.model, cached=False), replace(tiny_cfg.adapter, r=2, alpha=2 * scale)
    )
    set_adapter_state(small, truncate_state(state, 2))
    rest = residual_state(state, 2)
    assert rest
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = big(input_ids=ids).logits
        alone = small(input_ids=ids).logits
        with frozen_residual(small, rest):
            hooked = small(input_ids=ids).logits
        after = small(input_ids=ids).logits
    torch.testing.assert_close(hooked, want, atol=1e-4, rtol=1e-4)
    assert (alone - want).abs().max() > 1e-3  # the truncation alone is another model
    torch.testing.assert_close(after, alone)  # hooks are gone on exit
    # the residual trains nothing: gradients reach the adapter only
    with frozen_residual(small, rest):
        small(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in small.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # a residual naming a layer without LoRA is refused with its name
    with (
        pytest.raises(AdapterStateError, match="not a layer"),
        frozen_residual(
            small,
            {
                "nope.lora_A.weight": rest[next(iter(rest))],
                "nope.lora_B.weight": rest[next(iter(rest))],
            },
        ),
    ):
        pass
