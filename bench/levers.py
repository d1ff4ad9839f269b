"""Which lever makes an emulator-trained adapter transfer? A lean federated loop for trying one
lever at a time on E2E (or Shakespeare) without Flower: 6 devices split by restaurant name, 3
rounds of the default local steps, FedAvg of the adapter, no server training; the adapter is
plugged into the full model and scored on held-out meaning representations (their own split
here, made by this script: 40% of the `mr` held out, half of them scored).

It uses the project's own pieces (emulator building, distillation, LoRA, local training,
greedy generation, metrics), so a lever found here is then measured through the real app by
`python -m bench.transfer`. Each call appends one JSON line to bench/results/levers.jsonl:

    python -m bench.levers e2e '{"kind": "case3"}'
    python -m bench.levers e2e '{"kind": "region", "modules": ["q_proj", "v_proj"]}'
    python -m bench.levers e2e '{"kind": "emu", "keep": 0.4, "distill": 100, "dloss": "layerwise"}'

spec keys: kind (case3: LoRA on every layer of the full model; region: the full model with
the adapter region only; emu: devices train on an emulator), keep, bottom, top, modules, r, lr,
steps (local), rounds, choice (uniform / importance), distill (steps), dloss, dlr, adapt
(region: LoRA on the adapter region only, Offsite-Tuning's rule; held: on every layer the
emulator holds, the kept middle layers included, each delta plugged into the full model's layer
of the same index), share (true: layer sharing, CRaSh-style and training-free, so without
distill: the emulator keeps the full model's depth, each dropped layer run by the kept layer
below it; the kept layers' deltas are plugged into every layer they ran for, and into the kept
layers alone as `kept_only_*`), realign (steps: after every round the emulator's middle layers
are distilled again to the full model with the global adapter merged into both, FedBiOT-style;
region adapters only), rlr (its learning rate).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS

E2E = Path("../shared/data/e2e/dev.jsonl")
TEMPLATE = "Meaning representation: {}\nDescription:"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def e2e_split(seed: int = 1234) -> dict[str, Any]:
    rows = [json.loads(line) for line in E2E.read_text().splitlines() if line.strip()]
    mrs = sorted({r["mr"] for r in rows})
    perm = np.random.default_rng(seed).permutation(len(mrs))
    n_hold = int(0.4 * len(mrs))
    val = {mrs[i] for i in perm[: n_hold // 2]}
    test = {mrs[i] for i in perm[n_hold // 2 : n_hold]}
    server = {mrs[i] for i in perm[n_hold : n_hold + 27]}
    pool = [r for r in rows if r["mr"] not in val | test | server]
    names = sorted({r["name"] for r in pool})
    device_of = {n: i % 6 for i, n in enumerate(names)}

    def sample(r: dict[str, str]) -> dict[str, str]:
        return {"prompt": TEMPLATE.format(r["mr"]), "response": " " + r["ref"]}

    refs: dict[str, list[str]] = {}
    for r in rows:
        if r["mr"] in val:
            refs.setdefault(r["mr"], []).append(r["ref"])
    return {
        "parts": [[sample(r) for r in pool if device_of[r["name"]] == d] for d in range(6)],
        "server": [sample(r) for r in rows if r["mr"] in server],
        "held": [sample(r) for r in rows if r["mr"] in val][:160],
        "prompts": sorted(refs.items())[:80],
        "max_length": 96,
    }


def run(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    from fedpeat.config import compose
    from fedpeat.data import device_data, encode, server_data, server_train_data
    from fedpeat.distill import distill
    from fedpeat.emulator import adapter_region, build_emulator, keys_on_layers, to_full_keys
    from fedpeat.importance import block_influence
    from fedpeat.lora import (
        attach_lora,
        get_adapter_state,
        initial_adapter_state,
        set_adapter_state,
    )
    from fedpeat.model import load_model, load_tokenizer
    from fedpeat.train import evaluate_ppl, local_train
    from strategies.aggregation import weighted_average

    cfg = compose("")
    tok = load_tokenizer(cfg.model)
    pad, dev = int(tok.pad_token_id), torch.device("cpu")
    if task == "e2e":
        split = e2e_split()
    else:
        split = {
            "parts": [device_data(cfg.data, cfg.partition, d, 6).train for d in range(6)],
            "server": server_train_data(cfg.data),
            "held": server_data(replace(cfg.data, server_eval_samples=160)),
            "prompts": [],
            "max_length": cfg.data.max_length,
        }
    n_len = split["max_length"]
    parts = [encode(p, tok, n_len) for p in split["parts"]]
    held, server = encode(split["held"], tok, n_len), encode(split["server"], tok, n_len)
    full = load_model(cfg.model, dev, cached=False)
    n = int(full.config.num_hidden_layers)
    bottom, top = spec.get("bottom", 2), spec.get("top", 2)
    r = spec.get("r", 8)
    adapter = replace(
        cfg.adapter, target_modules=spec.get("modules", ATTENTION), r=r, alpha=2.0 * r
    )
    train = replace(cfg.train, lr=spec.get("lr", cfg.train.lr), local_steps=spec.get("steps", 4))
    began = time.time()
    kind = spec["kind"]
    model, layers, region = full, list(range(n)), None
    if kind != "case3":
        region = adapter_region(n, bottom, top)
    if kind == "emu":
        scores = None
        if spec.get("choice") == "importance":
            scores = block_influence(full, server, 4, 8, pad, dev)
        emu = build_emulator(full, spec["keep"], bottom, top, scores=scores)
        if spec.get("distill") and spec.get("share"):
            raise SystemExit("share is training-free here: drop distill")
        if spec.get("distill"):
            dcfg = replace(
                cfg.emulator.distill,
                steps=spec["distill"],
                lr=spec.get("dlr", 3e-4),
                samples=10**6,
                loss=spec.get("dloss", "layerwise"),
            )
            distill(emu, full, server, dcfg, pad, dev)
        model, layers = emu.model, emu.layers
        if spec.get("adapt", "region") == "held":
            region = list(layers)
        if spec.get("share"):
            # Layer sharing: the model keeps its depth, each dropped layer run by the kept
            # layer below it; its indices are the full model's, so keys need no remapping.
            kept = list(layers)
            model, layers = shared_model(full, kept), list(range(n))
            if spec.get("adapt", "region") == "held":
                region = kept
    build_s = time.time() - began
    work = attach_lora(
        copy.deepcopy(model), adapter, layers=None if region is None else _local(layers, region)
    )
    state = initial_adapter_state(get_adapter_state(work), 42)
    for rnd in range(spec.get("rounds", 3)):
        states, sizes = [], []
        for d, data in enumerate(parts):
            set_adapter_state(work, state)
            local_train(work, data, train, 42 + d + 100 * rnd, pad, dev)
            states.append(get_adapter_state(work))
            sizes.append(len(data))
        state = weighted_average(states, sizes)
        if kind == "emu" and spec.get("realign"):
            realign(
                emu,
                full,
                work,
                state,
                adapter,
                region or [],
                server,
                spec,
                cfg.emulator.distill,
                pad,
                dev,
            )
    set_adapter_state(work, state)
    emu_ppl = evaluate_ppl(work, held, 8, pad, dev).ppl
    full_state = to_full_keys(state, layers) if kind == "emu" else state
    kept_layers = region or list(range(n))
    out: dict[str, Any] = {
        "task": task,
        **spec,
        "layers_held": len(kept_layers) if spec.get("share") else len(layers),
        "emulator_ppl": emu_ppl,
        "build_s": build_s,
    }
    plugs = {"": region}
    if kind == "emu" and spec.get("adapt", "region") == "held":
        # Also plug in the adapter region's part alone: the kept middle layers' deltas then
        # only serve training on the emulator (they absorb its repair), not the full model.
        plugs["region_only_"] = adapter_region(n, bottom, top)
    if spec.get("share"):
        # Each kept layer's delta goes to every position that layer ran (CRaSh's plug-in);
        # also plugged into the kept layers alone.
        plugs = {"": list(range(n)), "kept_only_": kept_layers}
        full_state = replicate_shared(full_state, kept_layers, n)
    for prefix, plug_layers in plugs.items():
        plug = attach_lora(copy.deepcopy(full), adapter, layers=plug_layers)
        set_adapter_state(plug, keys_on_layers(full_state, plug_layers or range(n)))
        out[f"{prefix}plugin_ppl"] = evaluate_ppl(plug, held, 8, pad, dev).ppl
        if split["prompts"]:
            out.update(_task_scores(plug, tok, split["prompts"], pad, dev, prefix))
        if prefix == "" and kind == "emu" and spec.get("kd_back"):
            # Knowledge back: the plug-in imitates the emulator carrying the adapter on the
            # emulator's own greedy answers to the server's prompts (no server labels used).
            if split["prompts"]:
                out.update(_task_scores(work, tok, split["prompts"], pad, dev, "emulator_"))
            prompts = sorted({s["prompt"] for s in split["server"]})
            ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            kd_back(work, plug, ids, spec["kd_back"], spec.get("kd_lr", 3e-4), pad, tok, dev)
            out["kd_back_plugin_ppl"] = evaluate_ppl(plug, held, 8, pad, dev).ppl
            if split["prompts"]:
                out.update(_task_scores(plug, tok, split["prompts"], pad, dev, "kd_back_"))
    out["wall_s"] = time.time() - began
    return out


def _task_scores(
    plug: Any, tok: Any, prompts: list[Any], pad: int, dev: torch.device, prefix: str
) -> dict[str, float]:
    from fedpeat import metrics
    from fedpeat.train import generate_greedy

    ids = [tok(TEMPLATE.format(mr), add_special_tokens=False)["input_ids"] for mr, _ in prompts]
    gen = generate_greedy(plug, ids, 48, 16, pad, tok.eos_token_id, dev)
    hyps = [tok.decode(g, skip_special_tokens=True).strip().split("\n")[0] for g in gen]
    refs = [refs for _, refs in prompts]
    return {
        f"{prefix}bleu": metrics.corpus_bleu(hyps, refs),
        f"{prefix}rouge_l": float(
            np.mean([metrics.rouge_l(h, r) for h, r in zip(hyps, refs, strict=True)])
        ),
    }


def kd_back(
    teacher: Any,
    student: Any,
    prompts: list[list[int]],
    steps: int,
    lr: float,
    pad: int,
    tok: Any,
    dev: torch.device,
) -> None:
    """`steps` AdamW steps of KL(teacher || student) on the teacher's greedy answers."""
    from fedpeat.data import Encoded
    from fedpeat.distill import token_kl
    from fedpeat.train import collate, generate_greedy

    gen = generate_greedy(teacher, prompts, 48, 16, pad, tok.eos_token_id, dev)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    data = [
        Encoded(input_ids=p + g + eos, labels=[-100] * len(p) + g + eos)
        for p, g in zip(prompts, gen, strict=True)
    ]
    params = [p for p in student.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(0)
    student.train()
    for _ in range(steps):
        idx = rng.choice(len(data), size=min(8, len(data)), replace=False)
        batch = collate([data[i] for i in idx], pad)
        mask = batch["labels"][:, 1:] != -100
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = token_kl(s.logits[:, :-1], t.logits[:, :-1], mask)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    student.eval()


def realign(
    emu: Any,
    full: Any,
    work: Any,
    state: dict[str, Any],
    adapter: Any,
    region: list[int],
    server: list[Any],
    spec: dict[str, Any],
    base_distill: Any,
    pad: int,
    dev: torch.device,
) -> None:
    """The emulator's middle layers distilled again to the full model with the round's global
    adapter merged into both (FedBiOT-style): the middle then matches the full model on the
    inputs the adapted bottom layers now produce, not only on the base model's.

    Region adapters only: the middle layers carry no adapter, so the realigned middle weights
    go straight into the device model `work` for the next round.
    """
    from dataclasses import replace as dc_replace

    from fedpeat.distill import distill
    from fedpeat.emulator import keys_on_layers, layer_prefix, to_full_keys
    from fedpeat.lora import attach_lora, set_adapter_state

    if spec.get("adapt", "region") != "region":
        raise SystemExit("realign supports adapt=region only")
    teacher = attach_lora(copy.deepcopy(full), adapter, layers=region)
    set_adapter_state(teacher, keys_on_layers(to_full_keys(state, emu.layers), region))
    teacher = teacher.merge_and_unload()
    local = _local(emu.layers, region)
    student = attach_lora(copy.deepcopy(emu.model), adapter, layers=local)
    set_adapter_state(student, state)
    merged = dc_replace(emu, model=student.merge_and_unload())
    dcfg = replace(
        base_distill,
        steps=spec["realign"],
        lr=spec.get("rlr", 1e-4),
        samples=10**6,
        loss=spec.get("dloss", "layerwise"),
    )
    distill(merged, teacher, server, dcfg, pad, dev)
    k = len(emu.layers)
    src = dict(merged.model.named_modules())[layer_prefix(merged.model, k)]
    dst = dict(work.named_modules())[layer_prefix(work, k)]
    own = dict(emu.model.named_modules())[layer_prefix(emu.model, k)]
    for i in range(emu.bottom, k - emu.top):
        dst[i].load_state_dict(src[i].state_dict())
        own[i].load_state_dict(src[i].state_dict())


def shared_model(full: Any, kept: list[int]) -> Any:
    """The full model's depth with only `kept` layers' weights: position i runs the nearest
    kept layer at or below i (the same module object, so weights and adapters are shared)."""
    import torch.nn as nn

    model = copy.deepcopy(full)
    layers = model.model.layers
    rep = [max(k for k in kept if k <= i) for i in range(len(layers))]
    model.model.layers = nn.ModuleList([layers[r] for r in rep])
    # A shared attention module has one cache slot: run without the KV cache.
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def replicate_shared(state: dict[str, Any], kept: list[int], n: int) -> dict[str, Any]:
    """Copy each kept layer's adapter keys to the positions it ran for in `shared_model`."""
    import re

    out = dict(state)
    for i in range(n):
        r = max(k for k in kept if k <= i)
        if r == i:
            continue
        for key, value in state.items():
            m = re.search(r"\.layers\.(\d+)\.", key)
            if m and int(m.group(1)) == r:
                out[key.replace(f".layers.{r}.", f".layers.{i}.")] = value
    return out


def _local(layers: list[int], region: list[int]) -> list[int]:
    """Adapter-region layers in the model's own indices."""
    return [j for j, i in enumerate(layers) if i in region]


def main() -> None:
    if len(sys.argv) != 3:
        print(__doc__)
        raise SystemExit(2)
    task, spec = sys.argv[1], json.loads(sys.argv[2])
    if task == "e2e" and not E2E.is_file():
        raise SystemExit(f"{E2E} is absent: the E2E development set is needed")
    torch.set_num_threads(2)
    result = run(task, spec)
    print(json.dumps(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "levers.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
