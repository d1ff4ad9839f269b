"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, and config helpers."""

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
def gsm8k_path() -> Path:
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not present at {path}")
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
