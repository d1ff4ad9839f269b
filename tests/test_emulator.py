"""Emulators: layer choice, exact plug-in through key and module remapping, wire form and
device cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeat.config import AdapterConfig
from fedpeat.emulator import (
    EmulatorError,
    adapter_region,
    build_emulator,
    global_adapter_layers,
    keys_on_layers,
    local_adapter_layers,
    package,
    select_layers,
    to_emulator_keys,
    to_emulator_modules,
    to_full_keys,
    unpackage,
)
from fedpeat.emulator_cache import load_package, save_package
from fedpeat.lora import attach_lora, get_adapter_state, set_adapter_state
from fedpeat.model import load_model


@pytest.mark.parametrize(
    ("n", "keep", "expected"),
    [
        # 26 middle layers (2..27), keep 13: middle[round_half_up(i * 25 / 12)], i = 0..12
        (30, 0.5, [0, 1, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 28, 29]),
        # 26 middle, keep round(6.5) = 7: middle[round(i * 25 / 6)] = 2, 6, 10, 15, 19, 23, 27
        (30, 0.25, [0, 1, 2, 6, 10, 15, 19, 23, 27, 28, 29]),
        # 4 middle (2..5), keep 3: middle[round(i * 3 / 2)] = middle[0, 2, 3]
        (8, 0.75, [0, 1, 2, 4, 5, 6, 7]),
        # keep 2 of 4: first and last middle layer
        (8, 0.5, [0, 1, 2, 5, 6, 7]),
        # round(0.25 * 4) = 1, raised to 2: first and last always stay
        (8, 0.25, [0, 1, 2, 5, 6, 7]),
        (8, 1.0, list(range(8))),
        # a single middle layer is kept whatever the ratio
        (5, 0.1, [0, 1, 2, 3, 4]),
    ],
)
def test_layer_selection_by_hand(n: int, keep: float, expected: list[int]) -> None:
    assert select_layers(n, 2, 2, keep) == expected


def test_layer_selection_by_importance() -> None:
    # 8 layers, middle 2..5; the two highest-scoring middle layers stay (ties: lower index);
    # the adapter region's scores do not matter.
    scores = [9.0, 9.0, 0.1, 0.7, 0.3, 0.7, 9.0, 9.0]
    assert select_layers(8, 2, 2, 0.5, scores) == [0, 1, 3, 5, 6, 7]
    assert select_layers(8, 2, 2, 0.75, scores) == [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(EmulatorError, match="3 layer scores for a model of 8"):
        select_layers(8, 2, 2, 0.5, [1.0, 2.0, 3.0])


def test_block_influence_by_hand() -> None:
    """1 - cos(h_in, h_out) per layer, averaged over real tokens: a stand-in model whose
    'layers' rotate a 2-d state by known angles."""
    import math

    from fedpeat.data import Encoded
    from fedpeat.importance import block_influence

    class Out:
        def __init__(self, hidden):
            self.hidden_states = hidden

    class Stub(torch.nn.Module):
        def forward(self, input_ids, attention_mask, output_hidden_states):
            b, t = input_ids.shape
            h0 = torch.tensor([1.0, 0.0]).expand(b, t, 2)
            h1 = torch.tensor([0.0, 1.0]).expand(b, t, 2)  # 90 degrees: influence 1
            h2 = torch.tensor([0.0, 2.0]).expand(b, t, 2)  # same direction: influence 0
            c = math.cos(math.pi / 3)
            h3 = torch.tensor([math.sin(math.pi / 3), c]).expand(b, t, 2)  # 60 deg: 0.5
            return Out((h0, h1, h2, h3))

    data = [Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5], [4, 5])]
    got = block_influence(Stub(), data, 2, 1, 0, torch.device("cpu"))
    assert got == pytest.approx([1.0, 0.0, 0.5])


def test_layer_selection_rejects_bad_shapes() -> None:
    with pytest.raises(EmulatorError, match="exceed the model's 4 layers"):
        select_layers(4, 3, 2, 0.5)
    with pytest.raises(EmulatorError, match="outside"):
        select_layers(8, 2, 2, 0.0)
    assert adapter_region(8, 2, 2) == [0, 1, 6, 7]


@pytest.fixture(scope="module")
def emulator(full):
    return build_emulator(full, 0.5, 2, 2)


def test_emulator_keeps_only_the_selected_layers(full, emulator) -> None:
    # 12 layers, 8 middle (2..9), keep 4: middle[round(i * 7 / 3)] = 2, 4, 7, 9
    assert emulator.layers == [0, 1, 2, 4, 7, 9, 10, 11]
    assert emulator.adapter_layers == [0, 1, 6, 7]
    assert emulator.model.config.num_hidden_layers == 8
    assert full.config.num_hidden_layers == 12  # the full model is untouched
    for j, i in enumerate(emulator.layers):
        fw = full.model.layers[i].mlp.down_proj.weight
        ew = emulator.model.model.layers[j].mlp.down_proj.weight
        # equal up to the fp16 wire rounding, and never the same storage
        torch.testing.assert_close(ew, fw.half().float())
        assert ew.data_ptr() != fw.data_ptr()
    ids = torch.tensor([[5, 17, 900, 31]])
    with torch.no_grad():
        h_full = full(ids, output_hidden_states=True).hidden_states
        h_emu = emulator.model(ids, output_hidden_states=True).hidden_states
    # The bottom (adapter-region) layers compute the same thing in both models.
    torch.testing.assert_close(h_emu[2], h_full[2], atol=2e-3, rtol=1e-3)


def test_adapter_plugs_into_the_full_model_exactly(tiny_cfg, full, emulator) -> None:
    """An adapter trained on the emulator gives, on every adapter-region layer of the full
    model, the output W x + (alpha / r) B A x computed by hand."""
    cfg = AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    emu_lora = attach_lora(
        build_emulator(full, 0.5, 2, 2).model, cfg, layers=emulator.adapter_layers
    )
    rng = np.random.default_rng(0)
    trained = {
        k: rng.normal(size=v.shape).astype(np.float32)
        for k, v in get_adapter_state(emu_lora).items()
    }
    set_adapter_state(emu_lora, trained)
    global_state = to_full_keys(trained, emulator.layers)
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in global_state} == {0, 1, 10, 11}
    assert to_emulator_keys(global_state, emulator.layers) == trained

    full_lora = attach_lora(
        load_model(tiny_cfg.model, cached=False), cfg, layers=adapter_region(12, 2, 2)
    )
    set_adapter_state(full_lora, global_state)
    x = torch.randn(3, full.config.hidden_size)
    for j, i in zip(emulator.adapter_layers, [0, 1, 10, 11], strict=True):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        a = torch.from_numpy(global_state[f"{prefix}.lora_A.weight"])
        b = torch.from_numpy(global_state[f"{prefix}.lora_B.weight"])
        w = full.model.layers[i].self_attn.q_proj.weight
        by_hand = x @ w.T + (8 / 4) * (x @ a.T @ b.T)
        with torch.no_grad():
            out_full = full_lora.base_model.model.model.layers[i].self_attn.q_proj(x)
            out_emu = emu_lora.base_model.model.model.layers[j].self_attn.q_proj(x)
        torch.testing.assert_close(out_full, by_hand, atol=1e-4, rtol=1e-4)
        # the emulator's frozen weights went through fp16 on the wire
        torch.testing.assert_close(out_emu, by_hand, atol=2e-2, rtol=1e-2)


def test_adapter_keys_outside_the_region_are_refused(emulator) -> None:
    with pytest.raises(EmulatorError, match="outside the adapter region"):
        to_emulator_keys(
            {"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": np.zeros(1)},
            emulator.layers,
        )


def test_emulator_module_names_follow_the_layer_map() -> None:
    assert to_emulator_modules(
        ["layers.6.mlp.up_proj", "layers.0.self_attn.q_proj"], [0, 1, 2, 5, 6, 7]
    ) == [
        "layers.4.mlp.up_proj",
        "layers.0.self_attn.q_proj",
    ]


def test_wire_form_round_trips_and_hash_is_stable(full, emulator) -> None:
    pkg = package(emulator)
    assert package(build_emulator(full, 0.5, 2, 2)).digest == pkg.digest
    assert package(build_emulator(full, 0.75, 2, 2)).digest != pkg.digest
    assert "lm_head.weight" not in pkg.state  # tied to the embedding: sent once
    assert all(a.dtype == np.float16 for a in pkg.state.values())
    back = unpackage(pkg)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, emulator.model(ids).logits)
    pkg.state["model.norm.weight"] = pkg.state["model.norm.weight"] + np.float16(1)
    with pytest.raises(EmulatorError, match="hash mismatch"):
        unpackage(pkg)


def test_consumed_package_builds_the_same_model(emulator) -> None:
    # A device's load frees each package tensor once copied: same weights, empty package.
    pkg = package(emulator)
    kept = unpackage(pkg)
    n_tensors = len(pkg.state)
    consumed = unpackage(pkg, consume=True)
    assert pkg.state == {} and n_tensors > 0
    for (name, a), (_, b) in zip(
        kept.model.state_dict().items(), consumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_corrupt_cache_file_is_dropped(tmp_path, emulator) -> None:
    pkg = package(emulator)
    path = save_package(pkg, tmp_path)
    loaded = load_package(tmp_path, pkg.digest)
    assert loaded.layers == pkg.layers and loaded.digest == pkg.digest
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(EmulatorError, match="corrupt"):
        load_package(tmp_path, pkg.digest)
    assert not path.exists()
    with pytest.raises(EmulatorError, match="not in the device cache"):
        load_package(tmp_path, pkg.digest)


def test_a_derived_emulator_reads_back_only_what_is_kept(tmp_path, emulator) -> None:
    """`load_cached(keep=...)` returns only the kept tensors but verifies the whole file: a
    flipped byte in a tensor it does not keep still condemns the file."""
    from fedpeat.emulator_cache import load_cached, save_cached

    pkg = package(emulator)
    path = tmp_path / "derived.safetensors"
    save_cached(pkg, path, "recipe-1")
    keep = {k for k in pkg.state if ".layers.1." in k}
    got = load_cached(path, "recipe-1", keep=keep)
    assert got is not None and set(got.state) == keep and got.digest == pkg.digest
    assert all(np.array_equal(got.state[k], pkg.state[k]) for k in keep)
    assert load_cached(path, "recipe-2") is None and not path.exists()  # another derivation
    save_cached(pkg, path, "recipe-1")
    raw = bytearray(path.read_bytes())
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    assert last not in keep
    raw[-10] ^= 0xFF  # inside the file's last tensor
    path.write_bytes(bytes(raw))
    assert load_cached(path, "recipe-1", keep=keep) is None and not path.exists()


def test_held_adapter_layers_by_hand() -> None:
    # 12 layers, 1 + 1 region, middle 1..10: keep 0.4 keeps middle[0, 3, 6, 9] = 1, 4, 7, 10;
    # keep 0.3 keeps middle[0, 5, 9] = 1, 6, 10 (round(i * 9 / 2), half up).
    assert global_adapter_layers(12, 1, 1, "region", [0.4, 0.3]) == [0, 11]
    assert global_adapter_layers(12, 1, 1, "held", [0.4, 0.3]) == [0, 1, 4, 6, 7, 10, 11]
    keep_03 = select_layers(12, 1, 1, 0.3)
    assert keep_03 == [0, 1, 6, 10, 11]
    assert local_adapter_layers(keep_03, [0, 1, 4, 6, 7, 10, 11]) == [0, 1, 2, 3, 4]
    assert local_adapter_layers(keep_03, [0, 11]) == [0, 4]
    state = {
        "m.layers.4.q_proj.lora_A.weight": np.zeros(1),
        "m.layers.6.q_proj.lora_A.weight": np.ones(1),
        "m.norm.weight": np.ones(2),
    }
    assert sorted(keys_on_layers(state, keep_03)) == [
        "m.layers.6.q_proj.lora_A.weight",
        "m.norm.weight",
    ]
