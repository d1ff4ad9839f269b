"""Emulator packages on disk: a device's cache (one file per digest, verified on read) and the
server's cache of derived emulators (distilled ones, under their derivation key). A corrupt or
foreign file is deleted and reported, never trained on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeat.emulator import EmulatorError, Package, hash_start, hash_tensor

log = logging.getLogger(__name__)


def save_package(pkg: Package, directory: Path) -> Path:
    """Write `<digest>.safetensors` atomically; metadata carries config and layer map."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{pkg.digest}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    meta = {k: json.dumps(v) for k, v in pkg.meta().items()}
    save_file({k: np.ascontiguousarray(v) for k, v in pkg.state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_package(
    path: Path, digest: str | None, keep: Collection[str] | None = None
) -> tuple[Package, dict[str, Any], str]:
    """A package file's tensors (only those in `keep`, when given), metadata and the digest of
    its content, hashed tensor by tensor as they are read (a tensor not kept is dropped at
    once); `digest`: the name it was asked by (None: the one its metadata records).

    The file is read, not memory-mapped: the safetensors layout (an 8-byte header length, a
    JSON header of dtype, shape and byte offsets, then the data) read tensor by tensor, so
    verifying a large package never maps all of it into the process."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = {k: json.loads(v) for k, v in header.pop("__metadata__", {}).items()}
        h = hash_start(meta["config"], meta["layers"])
        state = {}
        for key in sorted(header):
            info = header[key]
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            value = np.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            if value.nbytes != end - start or f.readinto(value.data.cast("B")) != end - start:
                raise EmulatorError(f"{key}: {end - start} bytes on disk for {value.nbytes}")
            hash_tensor(h, key, value)
            if keep is None or key in keep:
                state[key] = value
    pkg = Package(
        meta["config"],
        list(meta["layers"]),
        float(meta["keep_ratio"]),
        int(meta["bottom"]),
        int(meta["top"]),
        int(meta["n_full_layers"]),
        state,
        meta["digest"] if digest is None else digest,
    )
    return pkg, meta, h.hexdigest()


def load_package(directory: Path, digest: str) -> Package:
    """Read and verify a cached emulator; a corrupt file is deleted and reported as missing."""

    path = directory / f"{digest}.safetensors"
    if not path.is_file():
        raise EmulatorError(f"emulator {digest[:12]} is not in the device cache")
    try:
        pkg, _, actual = _read_package(path, digest)
        if actual != digest:
            raise EmulatorError("content hash mismatch")
    except Exception as err:  # unreadable, truncated or tampered: never train on it
        path.unlink(missing_ok=True)
        raise EmulatorError(
            f"emulator {digest[:12]} in the device cache was corrupt ({err}); dropped"
        ) from err
    return pkg


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's config and every tensor in its own dtype: names the weights a
    distilled emulator was derived from (a different conversion or checkpoint misses)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def save_cached(pkg: Package, path: Path, key: str) -> None:
    """Write a derived emulator (e.g. distilled) under its derivation `key`, atomically."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    meta = {k: json.dumps(v) for k, v in {**pkg.meta(), "key": key}.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in pkg.state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_cached(path: Path, key: str, keep: Collection[str] | None = None) -> Package | None:
    """The emulator cached at `path` under `key` (only the tensors in `keep`, when given; the
    whole file is verified either way), or None when absent; a file that is corrupt or was
    written for another key is deleted (and None returned), never trained on."""

    if not path.is_file():
        return None
    try:
        pkg, meta, actual = _read_package(path, None, keep)
        if meta.get("key") != key:
            raise EmulatorError("written for another derivation")
        if actual != pkg.digest:
            raise EmulatorError("content hash mismatch")
    except Exception as err:  # unreadable, truncated or tampered: derive it again
        log.warning("cached emulator %s is unusable (%s); deriving it again", path.name, err)
        path.unlink(missing_ok=True)
        return None
    return pkg
