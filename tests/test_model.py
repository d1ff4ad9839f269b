"""Model loading: the tiny model, local directories, the embedded GGUF, and missing models."""

from __future__ import annotations

import pytest
import torch

from fedpeat.config import ModelConfig
from fedpeat.model import ModelNotFoundError, load_model, model_location


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
