"""Distillation of an emulator towards the full model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeat.emulator import build_emulator, package


def test_distillation_pulls_the_emulator_towards_the_full_model(tiny_cfg, full, tokenizer) -> None:
    from dataclasses import replace

    from fedpeat.data import encode, server_data, server_train_data
    from fedpeat.distill import distill, normalised_mse
    from fedpeat.train import collate

    # normalised MSE by hand: ||(1,1)-(1,0)||^2 / ||(1,0)||^2 = 1; a masked token is ignored.
    s = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(normalised_mse(s, t, torch.tensor([[1, 0]]))) == pytest.approx(1.0)

    cfg = replace(tiny_cfg.data, max_samples=600, server_train_fraction=0.4)
    train = encode(server_train_data(cfg), tokenizer, 32)
    held = collate(encode(server_data(cfg), tokenizer, 32)[:16], tokenizer.pad_token_id)
    emulator = build_emulator(full, 0.5, 2, 2)
    n, k = len(emulator.layers), emulator.n_full_layers

    def gap() -> float:
        """nMSE between the middle blocks' outputs on held-out text (the distillation target);
        a random tiny model has no perplexity signal to compare."""
        with torch.no_grad():
            kw = {"attention_mask": held["attention_mask"], "output_hidden_states": True}
            h_e = emulator.model.model(held["input_ids"], **kw).hidden_states[n - 2]
            h_f = full.model(held["input_ids"], **kw).hidden_states[k - 2]
        return float(normalised_mse(h_e, h_f, held["attention_mask"]))

    before = gap()
    dcfg = replace(tiny_cfg.emulator.distill, enabled=True, steps=60, lr=3e-4, samples=200)
    losses = distill(emulator, full, train, dcfg, tokenizer.pad_token_id, torch.device("cpu"))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert gap() < 0.5 * before
    # The adapter region is untouched: the plug-in stays exact.
    for j, i in zip([0, 1, n - 2, n - 1], [0, 1, k - 2, k - 1], strict=True):
        torch.testing.assert_close(
            emulator.model.model.layers[j].self_attn.q_proj.weight,
            full.model.layers[i].self_attn.q_proj.weight.half().float(),
        )


def test_targets_and_kl_by_hand(full) -> None:
    from fedpeat.distill import targets, token_kl

    emulator = build_emulator(full, 0.5, 2, 2)  # 12 layers: keeps 0, 1, 2, 4, 7, 9, 10, 11
    assert emulator.layers == [0, 1, 2, 4, 7, 9, 10, 11]
    # hidden_states[i] is layer i's input: the middle block ends where the top region starts.
    assert targets(emulator, "hidden") == [(6, 10)]
    assert targets(emulator, "layerwise") == [(3, 4), (4, 7), (5, 9), (6, 10)]
    assert targets(emulator, "kd") == []
    # KL((.5, .5) || (.9, .1)) = .5 ln(.5/.9) + .5 ln(.5/.1) = 0.5108; masked token ignored.
    t = torch.log(torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]))
    s = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    assert float(token_kl(s, t, torch.tensor([[1, 0]]))) == pytest.approx(0.5108, abs=1e-4)
    assert float(token_kl(t, t, torch.tensor([[1, 1]]))) == pytest.approx(0.0, abs=1e-6)


def test_kd_recipe_pulls_the_output_distribution_together(tiny_cfg, full, tokenizer) -> None:
    from dataclasses import replace

    from fedpeat.data import encode, server_train_data
    from fedpeat.distill import distill

    cfg = replace(tiny_cfg.data, max_samples=600, server_train_fraction=0.4)
    train = encode(server_train_data(cfg), tokenizer, 32)
    emulator = build_emulator(full, 0.5, 2, 2)
    dcfg = replace(
        tiny_cfg.emulator.distill,
        enabled=True,
        steps=40,
        lr=3e-4,
        samples=200,
        loss="layerwise+kd",
    )
    losses = distill(emulator, full, train, dcfg, tokenizer.pad_token_id, torch.device("cpu"))
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])


def _server(tiny_cfg, tmp_path, monkeypatch, **distill):
    from dataclasses import replace

    from fedpeat.server_model import ServerModel

    monkeypatch.setenv("FEDPEAT_CACHE_DIR", str(tmp_path))
    e = tiny_cfg.emulator
    dcfg = replace(e.distill, enabled=True, steps=3, samples=16, **distill)
    return ServerModel(replace(tiny_cfg, emulator=replace(e, distill=dcfg)))


def test_distilled_emulators_are_cached_on_disk(tiny_cfg, tmp_path, monkeypatch) -> None:
    import fedpeat.distill

    calls = []
    real = fedpeat.distill.distill
    monkeypatch.setattr(
        fedpeat.distill, "distill", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = _server(tiny_cfg, tmp_path, monkeypatch)
    digest = first.package(0.4).digest
    files = sorted((tmp_path / "emulators").glob("*.safetensors"))
    assert calls == [1] and len(files) == 1  # miss: distilled once, written

    again = _server(tiny_cfg, tmp_path, monkeypatch)
    sent = again.package(0.4)  # hit: the cache file is the package, no emulator built
    assert sent.digest == digest and calls == [1] and not again.emulators
    assert again.emulator(0.4).distilled
    built = package(again.emulator(0.4), torch.float16)  # the same bytes as from the emulator
    assert built.digest == digest and built.state.keys() == sent.state.keys()
    assert all(np.array_equal(v, sent.state[k]) for k, v in built.state.items())

    changed = _server(tiny_cfg, tmp_path, monkeypatch, lr=5e-4)  # another recipe: a miss
    assert changed.package(0.4).digest != digest and calls == [1, 1]
    assert len(list((tmp_path / "emulators").glob("*.safetensors"))) == 2

    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated: dropped, distilled again
    fixed = _server(tiny_cfg, tmp_path, monkeypatch)
    assert fixed.package(0.4).digest == digest and calls == [1, 1, 1]
    assert files[0].is_file()


def test_middle_block_alone_reproduces_the_whole_forward(full, tokenizer) -> None:
    """Distillation runs the middle layers on cached inputs: on right-padded batches that must
    give the model's own hidden states at every real token."""
    from fedpeat.data import encode
    from fedpeat.distill import _run_layers
    from fedpeat.train import collate

    texts = ["ROMEO:\nBut soft, what light", "JULIET:\nAy me! Romeo, Romeo, wherefore art thou"]
    batch = collate(encode([{"prompt": "", "response": t} for t in texts], tokenizer, 32), 0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        states = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        outs = _run_layers(full, full.model.layers[2:9], states.hidden_states[2], mask)
    real = mask.bool()
    for j, i in enumerate(range(3, 10)):
        torch.testing.assert_close(outs[j][real], states.hidden_states[i][real])


def test_align_inputs_keep_prompts_alone_and_text_whole(tokenizer) -> None:
    from fedpeat.distill import align_inputs

    samples = [
        {"prompt": "Q: one A: ", "response": "1"},
        {"prompt": "Q: one A: ", "response": "uno"},  # same prompt: once
        {"prompt": "", "response": "plain text of a play"},
        {"prompt": "Q: two A: ", "response": "2"},
    ]
    out = align_inputs(samples, tokenizer, 64, limit=10)
    assert len(out) == 3
    one = tokenizer("Q: one A: ", add_special_tokens=False)["input_ids"]
    assert out[0].input_ids == one and out[0].labels == [-100] * len(one)  # no label survives
    assert out[1].labels[1:] == out[1].input_ids[1:]  # text: compared where encode labels it
    assert len(align_inputs(samples, tokenizer, 64, limit=2)) == 2


def test_teacher_data_appends_the_teachers_answer(full, tokenizer) -> None:
    from fedpeat.data import Encoded
    from fedpeat.distill import teacher_data
    from fedpeat.train import generate_greedy

    prompt = tokenizer("Q: two A: ", add_special_tokens=False)["input_ids"]
    text = Encoded([5, 6, 7], [5, 6, 7])
    inputs = [Encoded(prompt, [-100] * len(prompt)), text]
    cpu = torch.device("cpu")
    out = teacher_data(full, inputs, 4, 64, 2, tokenizer.pad_token_id, None, cpu)
    answer = generate_greedy(full, [prompt], 4, 1, tokenizer.pad_token_id, None, cpu)[0]
    assert len(answer) == 4  # no EOS id: the full budget
    assert out[0] is text
    assert out[1].input_ids == prompt + answer
    assert out[1].labels == [-100] * len(prompt) + answer
    # Truncation to max_length keeps the prompt and cuts the answer.
    cut = teacher_data(full, inputs[:1], 4, len(prompt) + 1, 2, tokenizer.pad_token_id, None, cpu)
    assert cut[0].input_ids == prompt + answer[:1]


def test_knowledge_back_moves_the_student_to_the_teacher_only(tiny_cfg, full, tokenizer) -> None:
    """A student equal to its teacher starts at KL 0 (no dropout noise); one that differs is
    pulled towards the teacher on the compared tokens, and only its adapter moves."""
    import copy

    from fedpeat.data import encode, server_train_data
    from fedpeat.distill import knowledge_back, token_kl
    from fedpeat.lora import attach_lora, get_adapter_state, set_adapter_state
    from fedpeat.train import collate

    cpu, pad = torch.device("cpu"), tokenizer.pad_token_id
    data = encode(server_train_data(tiny_cfg.data), tokenizer, 24)[:16]
    student = attach_lora(copy.deepcopy(full), tiny_cfg.adapter)
    state = get_adapter_state(student)
    teacher = copy.deepcopy(student)
    assert knowledge_back(teacher, student, data, 1, 0.0, 4, pad, cpu) == pytest.approx([0.0])

    # The teacher: the same model with another adapter (random B); the student's B is zero.
    rng = np.random.default_rng(0)
    other = {
        k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if "lora_B" in k else v)
        for k, v in state.items()
    }
    set_adapter_state(teacher, other)
    batch = collate(data, pad)
    mask = batch["labels"][:, 1:] != -100

    def kl() -> float:
        with torch.no_grad():
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            return float(token_kl(student(**kw).logits[:, :-1], teacher(**kw).logits[:, :-1], mask))

    before = kl()
    knowledge_back(teacher, student, data, 40, 1e-3, 4, pad, cpu)
    assert before > 0 and kl() < 0.5 * before
    # Only the adapter learned: the base weights are the model's.
    torch.testing.assert_close(
        student.base_model.model.model.layers[0].mlp.up_proj.weight,
        full.model.layers[0].mlp.up_proj.weight,
    )
