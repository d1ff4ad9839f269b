"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, a few encoded samples, LoRA on
the tiny model, and config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT.parent / "shared" / "data"

# Converted weights and tokenizers are cached across test sessions (make test sets the same).
os.environ.setdefault("FEDPEAT_CACHE_DIR", str(PROJECT / ".cache" / "fedpeat"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cfg():
    from fedpeat.config import compose

    return compose("experiment=tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from fedpeat.model import load_tokenizer

    return load_tokenizer(tiny_cfg.model)


@pytest.fixture()
def data(tokenizer):
    from fedpeat.data import encode

    texts = ["ROMEO:\nBut soft, what light through yonder window breaks?"] * 4
    return encode([{"prompt": "", "response": t} for t in texts], tokenizer, 32)


@pytest.fixture()
def lora(tiny_cfg):
    from fedpeat.lora import attach_lora
    from fedpeat.model import load_model

    base = load_model(tiny_cfg.model, cached=False)
    return attach_lora(base, tiny_cfg.adapter, seed=0)


@pytest.fixture(scope="module")
def full(tiny_cfg):
    """The tiny model, shared by a module's tests (which must not change it)."""
    from fedpeat.model import load_model

    return load_model(tiny_cfg.model, cached=False)


@pytest.fixture()
def gsm8k_path() -> Path:
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not present at {path}")
    return path


@pytest.fixture()
def e2e_path() -> Path:
    path = SHARED_DATA / "e2e" / "dev.jsonl"
    if not path.is_file():
        pytest.skip(f"E2E not present at {path}")
    return path


@pytest.fixture()
def server_identity(monkeypatch):
    """What the ServerApp runtime sets before `Message(...)` may be built outside it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def device_disks(tmp_path, monkeypatch):
    """Simulated devices' disk caches under this test's directory."""
    monkeypatch.setenv("FEDPEAT_DEVICE_CACHE_DIR", str(tmp_path / "devices"))
    return tmp_path / "devices"
