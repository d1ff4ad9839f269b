"""Parsing, samples, splits, partitions and tokenization."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fedpeat.config import DataConfig, PartitionConfig, compose
from fedpeat.data import (
    DataError,
    device_data,
    encode,
    eval_prompts,
    group_keys,
    jsonl_samples,
    load_samples,
    parse_play,
    partition_indices,
    server_data,
    server_split,
    server_train_data,
    speeches_to_samples,
    train_test_split,
)

PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ROMEO and JULIET_

**ROMEO**  
First line,  
second line.

**JULIET.**  
Reply.

_Exit ROMEO_

### SCENE II. A garden.

**NURSE**  
Madam!

**JULIET**  
Anon.
"""


def test_parse_play_by_hand() -> None:
    speeches = parse_play(PLAY, "A Play")
    assert [(s.scene, s.speaker, s.text) for s in speeches] == [
        (2, "ROMEO", "First line,\nsecond line."),
        (2, "JULIET", "Reply."),
        (3, "NURSE", "Madam!"),
        (3, "JULIET", "Anon."),
    ]


def test_samples_never_cross_a_scene() -> None:
    samples = speeches_to_samples(parse_play(PLAY, "A Play"), per_sample=3)
    assert [s["response"] for s in samples] == [
        "ROMEO:\nFirst line,\nsecond line.\n\nJULIET:\nReply.",
        "NURSE:\nMadam!\n\nJULIET:\nAnon.",
    ]
    assert [(s["play"], s["role"], s["prompt"]) for s in samples] == [
        ("A Play", "JULIET", ""),
        ("A Play", "JULIET", ""),
    ]


def test_shakespeare_corpus_is_the_plays() -> None:
    samples = load_samples(DataConfig())
    plays = {s["play"] for s in samples}
    assert (len(plays) >= 35 and "Hamlet, Prince of Denmark" in plays) or any(
        "Hamlet" in p for p in plays
    )
    assert len(samples) > 5000
    assert all(s["response"] for s in samples)


def test_server_split_is_disjoint_and_seeded() -> None:
    held, train, pool = server_split(100, 0.1, seed=3, train_fraction=0.05)
    assert (len(held), len(train), len(pool)) == (10, 5, 85)
    assert not set(held) & set(pool) and not set(train) & set(pool) and not set(held) & set(train)
    assert set(held) | set(train) | set(pool) == set(range(100))
    np.testing.assert_array_equal(held, server_split(100, 0.1, seed=3)[0])
    assert not np.array_equal(held, server_split(100, 0.1, seed=4)[0])


def test_train_test_split_keeps_both_sides() -> None:
    train, test = train_test_split(np.arange(3), 0.1, seed=0)
    assert len(test) == 1 and len(train) == 2
    with pytest.raises(DataError, match="at least 2"):
        train_test_split(np.arange(1), 0.1, seed=0)


def _synthetic(n_per_group: int, groups: int) -> list[dict[str, str]]:
    return [
        {"prompt": "", "response": f"{g}-{i}", "play": f"p{g}"}
        for g in range(groups)
        for i in range(n_per_group)
    ]


def test_natural_partition_keeps_each_play_on_one_device() -> None:
    samples = _synthetic(5, groups=7)
    parts = partition_indices(samples, PartitionConfig(kind="natural", by="play"), 3, seed=0)
    assert len(parts) == 3
    assert sorted(np.concatenate(parts).tolist()) == list(range(35))
    owners = {}
    for device, idx in enumerate(parts):
        for i in idx:
            owners.setdefault(samples[i]["play"], set()).add(device)
    assert all(len(v) == 1 for v in owners.values())
    # 7 plays into 3 devices, groups of 2, the first takes the remainder ("allow-bigger").
    assert sorted(len(p) for p in parts) == [10, 10, 15]


def test_natural_partition_with_fewer_than_two_plays_per_device() -> None:
    # 38 plays on 20 devices: a fixed group size of 1 would make 38 groups; instead the sorted
    # plays are split into 20 runs (18 of 2 plays, 2 of 1), each play still on one device.
    samples = _synthetic(2, groups=38)
    parts = partition_indices(samples, PartitionConfig(kind="natural", by="play"), 20, seed=0)
    assert len(parts) == 20
    assert sorted(np.concatenate(parts).tolist()) == list(range(76))
    plays = [{samples[i]["play"] for i in idx} for idx in parts]
    assert sorted(len(p) for p in plays) == [1] * 2 + [2] * 18
    assert len(set().union(*plays)) == 38 and sum(len(p) for p in plays) == 38


def test_natural_partition_needs_enough_ids() -> None:
    with pytest.raises(DataError, match="fewer than the 5 devices"):
        partition_indices(_synthetic(3, 2), PartitionConfig(kind="natural", by="play"), 5, seed=0)


def test_iid_and_dirichlet_partitions_cover_the_data() -> None:
    samples = _synthetic(40, groups=4)
    for cfg in (
        PartitionConfig(kind="iid"),
        PartitionConfig(kind="dirichlet", by="play", alpha=0.3),
    ):
        parts = partition_indices(samples, cfg, 4, seed=1)
        assert sorted(np.concatenate(parts).tolist()) == list(range(160))
    iid = partition_indices(samples, PartitionConfig(kind="iid"), 4, seed=1)
    assert sorted(len(p) for p in iid) == [40, 40, 40, 40]


def test_partition_by_unknown_column_names_it() -> None:
    with pytest.raises(DataError, match="partition.by='speaker' is not a column"):
        partition_indices(
            _synthetic(3, 3), PartitionConfig(kind="natural", by="speaker"), 2, seed=0
        )


def test_devices_never_see_the_server_data() -> None:
    cfg = replace(compose().data, max_samples=400, server_eval_samples=1000)
    part = PartitionConfig(kind="iid")
    splits = [device_data(cfg, part, i, 4) for i in range(4)]
    # Samples are the corpus's own dict objects: compare identities, not (repeatable) texts.
    device = [id(s) for d in splits for s in d.train + d.test]
    val = [id(s) for s in server_data(cfg)]
    test = [id(s) for s in server_data(cfg, "test")]
    assert val and test and not set(val) & set(test)
    held = val + test
    train = [id(s) for s in server_train_data(cfg)]
    assert held and train
    assert not set(held) & set(device) and not set(train) & set(device)
    assert not set(held) & set(train)
    # Every sample is somewhere, exactly once.
    assert len(set(device) | set(held) | set(train)) == len(device) + len(held) + len(train) == 400


def test_jsonl_errors_name_file_and_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json}\n')
    cfg = DataConfig(source="jsonl", path=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_samples(cfg, bad)
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field\(s\) \['answer'\]"):
        jsonl_samples(cfg, bad)
    with pytest.raises(DataError, match="no such file"):
        jsonl_samples(cfg, tmp_path / "absent.jsonl")


def test_jsonl_prompt_template(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "answer": "4", "topic": "math"}) + "\n")
    (s,) = jsonl_samples(DataConfig(source="jsonl", path=str(f)), f)
    assert s == {"prompt": "Question: 2+2?\nAnswer: ", "response": "4", "topic": "math"}


def test_gsm8k_loads_as_prompt_response(gsm8k_path) -> None:
    cfg = compose(f"data=jsonl data.path={gsm8k_path} data.max_samples=50").data
    samples = load_samples(cfg)
    assert len(samples) == 50
    assert all(s["prompt"].startswith("Question: ") and "####" in s["response"] for s in samples)


def test_encode_masks_the_prompt(tokenizer) -> None:
    (e,) = encode([{"prompt": "Question: hi\nAnswer: ", "response": "yes"}], tokenizer, 64)
    n_prompt = len(tokenizer("Question: hi\nAnswer: ", add_special_tokens=False)["input_ids"])
    assert e.labels[:n_prompt] == [-100] * n_prompt
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
    assert e.input_ids[-1] == tokenizer.eos_token_id
    # A response truncated away entirely carries no loss: the sample is dropped.
    assert encode([{"prompt": "word " * 50, "response": "yes"}], tokenizer, 8) == []


def test_hf_source_reads_a_saved_dataset_directory(tmp_path) -> None:
    import datasets

    rows = {"question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"], "topic": ["x", "y", "x"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = compose(f"data=hf data.path={tmp_path / 'ds'}").data
    samples = load_samples(cfg)
    assert [s["response"] for s in samples] == ["1", "2", "3"]
    assert samples[0]["prompt"] == "Question: a?\nAnswer: " and samples[1]["topic"] == "y"
    with pytest.raises(DataError, match="cannot load dataset"):
        load_samples(compose(f"data=hf data.path={tmp_path / 'absent'}").data)


def _e2e_like(tmp_path, n_prompts: int = 30, refs: int = 3) -> DataConfig:
    path = tmp_path / "e2e.jsonl"
    rows = [
        {
            "mr": f"name[R{p % 7}], food[F{p}]",
            "ref": f"R{p % 7} serves F{p} ({r})",
            "name": f"R{p % 7}",
        }
        for p in range(n_prompts)
        for r in range(refs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(
        name="e2e",
        source="jsonl",
        path=str(path),
        prompt_field="mr",
        response_field="ref",
        server_fraction=0.4,
        server_train_fraction=0.1,
        server_eval_samples=1000,
    )


def test_split_goes_by_prompt_never_by_row(tmp_path) -> None:
    cfg = _e2e_like(tmp_path)
    prompts = {
        "validation": {s["prompt"] for s in server_data(cfg)},
        "test": {s["prompt"] for s in server_data(cfg, "test")},
        "server train": {s["prompt"] for s in server_train_data(cfg)},
        "devices": {
            s["prompt"]
            for i in range(3)
            for s in device_data(cfg, PartitionConfig(kind="natural", by="name"), i, 3).train
        },
    }
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], f"{a} and {b} share a prompt"
    # 30 prompts: 12 held out (6 validation, 6 test), 3 for the server's training.
    assert (len(prompts["validation"]), len(prompts["test"]), len(prompts["server train"])) == (
        6,
        6,
        3,
    )
    # Every reference of a held-out prompt comes with it.
    items = eval_prompts(cfg, "test")
    assert len(items) == 6 and all(len(refs) == 3 for _, refs in items)
    assert {p for p, _ in items} == prompts["test"]
    assert len(eval_prompts(cfg, "test", limit=4)) == 4


def test_group_keys_and_grouped_server_split() -> None:
    samples = [{"prompt": p, "response": "r"} for p in ["a", "b", "a", "c", "b", "d"]]
    keys = group_keys(samples)
    assert keys[0] == keys[2] and keys[1] == keys[4]
    held, train, pool = server_split(keys, 0.25, seed=0, train_fraction=0.25)
    for part in (held, train, pool):
        assert len({keys[i] for i in part}) == len({keys[i] for i in part})
        for i in part:  # a prompt's rows all sit on one side
            assert all(j in part for j in range(6) if keys[j] == keys[i])
    # Without prompts (Shakespeare) every sample is its own group.
    plain = group_keys([{"prompt": "", "response": "x"}] * 3)
    assert len(set(plain)) == 3


def test_device_holdout_splits_by_prompt() -> None:
    keys = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    train, test = train_test_split(np.arange(10, 18), 0.25, seed=0, groups=keys)
    held = {keys[i - 10] for i in test}
    assert len(held) == 1 and len(test) == 2
    assert not held & {keys[i - 10] for i in train}


def test_iid_partition_shuffles() -> None:
    # A corpus stored in blocks (play A's samples, then play B's): contiguous IID blocks would
    # give device 0 only play A.
    samples = [{"prompt": "", "response": "x", "play": "A" if i < 50 else "B"} for i in range(100)]
    parts = partition_indices(samples, PartitionConfig(kind="iid"), 2, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    for part in parts:
        plays = {samples[i]["play"] for i in part}
        assert plays == {"A", "B"}
        assert not np.array_equal(np.sort(part), np.arange(part.min(), part.min() + len(part)))
    again = partition_indices(samples, PartitionConfig(kind="iid"), 2, seed=0)
    np.testing.assert_array_equal(parts[0], again[0])


def test_e2e_experiment_without_its_data_names_the_file(tmp_path) -> None:
    cfg = compose(f"experiment=e2e data.path={tmp_path / 'absent' / 'dev.jsonl'}")
    assert cfg.eval.metrics == ["bleu", "rouge_l"] and cfg.partition.by == "name"
    with pytest.raises(DataError, match=r"data.path: no such file .*absent/dev.jsonl"):
        load_samples(cfg.data)


def test_e2e_experiment_on_the_shared_data(e2e_path) -> None:
    cfg = compose(f"experiment=e2e data.path={e2e_path}")
    val, test = eval_prompts(cfg.data, "validation"), eval_prompts(cfg.data, "test")
    assert len(val) > 80 and len(test) > 80
    assert not {p for p, _ in val} & {p for p, _ in test}
    assert sum(len(r) for _, r in val) > 4 * len(val)  # several references per prompt
    sizes = [len(device_data(cfg.data, cfg.partition, i, 6).train) for i in range(6)]
    assert min(sizes) > 50


def test_a_node_reads_its_own_data_never_the_servers(tmp_path) -> None:
    import datasets

    from fedpeat.node_data import node_data, node_key_of

    server = _e2e_like(tmp_path)
    server = replace(server, path=str(tmp_path / "server-only" / "absent.jsonl"))
    own = tmp_path / "node-a.jsonl"
    rows = [{"mr": f"name[N{p}]", "ref": f"N{p} is good ({r})"} for p in range(10) for r in (0, 1)]
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The server's file does not exist where the node runs: the node never opens it.
    split = node_data(server, str(own))
    assert len(split.train) + len(split.test) == 20 and split.test
    # The server's fields and template.
    assert all(s["prompt"].startswith("Question: name[N") for s in split.train)
    # Split by prompt: both references of a meaning representation land on one side.
    train_prompts = {s["prompt"] for s in split.train}
    assert not train_prompts & {s["prompt"] for s in split.test}
    # A saved dataset directory reads the same way; plain-text servers read a `text` column.
    datasets.Dataset.from_dict({"text": ["one line", "two lines", "three"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    text = node_data(DataConfig(), str(tmp_path / "ds"))
    assert sorted(s["response"] for s in [*text.train, *text.test]) == [
        "one line",
        "three",
        "two lines",
    ]
    with pytest.raises(DataError, match="node config data-path: no such file or directory"):
        node_data(server, str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(DataError, match=r"data-path=.*bad.jsonl: .*missing field\(s\) \['mr'"):
        node_data(server, str(tmp_path / "bad.jsonl"))
    (tmp_path / "one.jsonl").write_text('{"mr": "a", "ref": "b"}\n')
    with pytest.raises(DataError, match="1 sample\\(s\\); a node needs at least 2"):
        node_data(server, str(tmp_path / "one.jsonl"))
    # A node known by its data alone keeps its cache name; two data files, two names.
    assert node_key_of(str(own)) == node_key_of(str(tmp_path / "." / "node-a.jsonl"))
    assert node_key_of(str(own)) != node_key_of(str(tmp_path / "ds"))
