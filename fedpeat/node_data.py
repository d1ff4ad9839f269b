"""A deployed node's own private data (node config `data-path`).

In deployment each partner holds its own data, not a partition of the server's corpus: a node
whose config names `data-path` reads that JSONL file or saved dataset directory with the
server's data config (fields, prompt template, maximum length), never the file the server's
`data.path` names, and keeps a held-out share of it (split by prompt, as every split is) for
its own evaluation. The server keeps its corpus for its own training and evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedpeat.config import DataConfig
from fedpeat.data import DataError, DeviceData, group_keys, load_samples, train_test_split
from fedpeat.protocol import DATA_PATH


def node_data_config(cfg: DataConfig, path: str) -> DataConfig:
    """The server's data config reading `path` instead of its own corpus: a file as JSONL, a
    directory as a saved dataset. Where the server reads plain text (the embedded Shakespeare),
    a node's rows carry it in `text` (or the configured `text_field`)."""
    where = Path(path).expanduser()
    if not where.exists():
        raise DataError(f"node config {DATA_PATH}: no such file or directory {where}")
    source = "jsonl" if where.is_file() else "hf"
    own = replace(cfg, source=source, path=str(where.resolve()), max_samples=0)
    if cfg.source == "shakespeare" and not cfg.text_field:
        own = replace(own, text_field="text")
    return own


def node_data(cfg: DataConfig, path: str) -> DeviceData:
    """A node's train and held-out samples from its own data at `path` (all of it is the
    node's: no server split, no partition)."""
    own = node_data_config(cfg, path)
    try:
        samples = load_samples(own)
    except DataError as err:
        raise DataError(f"node config {DATA_PATH}={path}: {err}") from err
    if len(samples) < 2:
        raise DataError(
            f"node config {DATA_PATH}={path}: {len(samples)} sample(s); a node needs at least 2 "
            "(some to train on, some held out)"
        )
    keys = group_keys(samples)
    train, test = train_test_split(
        np.arange(len(samples)), cfg.device_test_fraction, cfg.seed, keys
    )
    return DeviceData([samples[i] for i in train], [samples[i] for i in test])


def node_key_of(path: str) -> str:
    """A device cache name for a node known by its data alone (no partition id): stable across
    restarts of the node, distinct for nodes with different data on one machine."""
    digest = hashlib.sha256(str(Path(path).expanduser().resolve()).encode()).hexdigest()
    return f"device-{digest[:12]}"
