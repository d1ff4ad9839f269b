"""bitsandbytes 4-bit NF4 on the device the frozen weights are quantized for, checked end to end.

The model of the experiment is quantized the way a device quantizes its emulator
(`fedpeat.quantization.quantize_frozen`, 4 bits, compute dtype from the device) and set beside
the same model unquantized at the compute dtype:

  layers     every decoder linear layer became a `Linear4bit` whose weight lives on the device as
             packed 4-bit codes (uint8, two weights a byte)
  storage    the decoder linear weights' bytes against the unquantized ones (NF4 with its absmax
             per 64 weights: about 4.5 / 16 of bf16)
  error      the relative Frobenius error of each dequantized weight (NF4 on normal weights:
             about 0.1), and the perplexity of held-out text quantized against unquantized
  training   two LoRA steps on the quantized model: finite loss, every adapter tensor moved,
             no frozen weight touched
  memory     the CUDA allocator's peak of those steps (on a GPU)

Each check has a bound; a check outside it exits non-zero. On a CPU (bench/gpu.sh --dry-run)
the same code runs on bitsandbytes' CPU back end.
Writes bench/results/cuda_check.{json,md} (or --out).

    python -m bench.cuda_check [--device cuda] [--overrides "..."]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from bench.common import machine, table, write_json, write_md

STORAGE_MAX = 0.32  # NF4 packs 4 bits plus a 4-byte absmax per 64 weights: 4.5 / 16 of bf16
DEQUANT_ERROR_MAX = 0.2  # NF4's relative error on normally distributed weights is about 0.1
PPL_RATIO_MAX = 1.5  # the quantized model's held-out perplexity over the unquantized one


def _linear_weights(model: Any) -> dict[str, Any]:
    """The decoder's linear weights by module name (the layers quantization replaces)."""
    import torch

    return {
        name: module.weight
        for name, module in model.named_modules()
        if ".layers." in f".{name}." and isinstance(module, torch.nn.Linear)
    }


def check(overrides: str, where: str) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch

    from fedpeat.config import compose
    from fedpeat.data import encode, server_data, server_train_data
    from fedpeat.lora import attach_lora
    from fedpeat.model import load_model, load_tokenizer
    from fedpeat.quantization import compute_dtype, fast_bf16, quantize_frozen
    from fedpeat.train import evaluate_ppl, local_train

    torch.manual_seed(0)
    cfg = compose(overrides)
    device = torch.device(where)
    dtype = compute_dtype(4, getattr(torch, cfg.model.dtype), fast_bf16(device))
    tok = load_tokenizer(cfg.model)
    pad = int(tok.pad_token_id)
    held_out = encode(server_data(cfg.data)[:16], tok, cfg.data.max_length)
    train = encode(server_train_data(cfg.data)[:64], tok, cfg.data.max_length)

    ref: Any = load_model(cfg.model, torch.device("cpu"), cached=False)
    ref.to(device=device, dtype=dtype)
    ref_weights = {k: w.detach().float().cpu() for k, w in _linear_weights(ref).items()}
    ref_bytes = sum(w.numel() * w.element_size() for w in _linear_weights(ref).values())
    chunk = cfg.train.loss_chunk
    ref_ppl = evaluate_ppl(ref, held_out, cfg.train.eval_batch_size, pad, device, chunk).ppl
    del ref

    model = load_model(cfg.model, torch.device("cpu"), cached=False)
    quantize_frozen(model, 4, device, dtype)
    layers: dict[str, Any] = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    packed = [m.weight for m in layers.values()]
    on_device = all(w.device.type == device.type and w.dtype == torch.uint8 for w in packed)
    q_bytes = sum(w.numel() * w.element_size() for w in packed)
    q_bytes += sum(  # each weight's quantization state: absmax and the code book
        m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
        for m in layers.values()
    )
    errors = []
    for name, module in layers.items():
        w = module.weight
        back = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().cpu()
        exact = ref_weights[name]
        errors.append(float((back - exact).norm() / exact.norm()))
    q_ppl = evaluate_ppl(model, held_out, cfg.train.eval_batch_size, pad, device, chunk).ppl

    lora = attach_lora(model, cfg.adapter)
    adapter = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = local_train(lora, train, replace(cfg.train, local_steps=2), 0, pad, device)
    params = dict(lora.named_parameters())
    moved = sum(not torch.equal(params[n].detach(), v) for n, v in adapter.items())
    still = all(torch.equal(params[n].detach(), v) for n, v in frozen.items())

    checks = {
        "every decoder linear is NF4": len(layers) == len(ref_weights) > 0,
        "packed 4-bit weights on the device": on_device,
        f"storage <= {STORAGE_MAX} of the compute dtype": q_bytes / ref_bytes <= STORAGE_MAX,
        f"dequantization error <= {DEQUANT_ERROR_MAX}": max(errors) <= DEQUANT_ERROR_MAX,
        f"perplexity ratio <= {PPL_RATIO_MAX}": q_ppl / ref_ppl <= PPL_RATIO_MAX,
        "LoRA steps: finite loss": bool(torch.isfinite(torch.tensor(result.train_loss))),
        "LoRA steps: every adapter tensor moved": moved == len(adapter) > 0,
        "LoRA steps: frozen weights untouched": still,
    }
    return {
        "device": where,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "linear_layers": len(ref_weights),
        "nf4_layers": len(layers),
        "storage_ratio": q_bytes / ref_bytes,
        "dequant_error_mean": sum(errors) / len(errors),
        "dequant_error_max": max(errors),
        "ppl_unquantized": ref_ppl,
        "ppl_nf4": q_ppl,
        "train_loss": result.train_loss,
        "train_tokens_per_s": result.tokens / result.seconds,
        "train_peak_mb": result.peak_mem_mb,
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--out", default="cuda_check", help="result files' name")
    args = parser.parse_args()
    r = check(args.overrides, args.device)
    rows = [[name, "pass" if ok else "FAIL"] for name, ok in r["checks"].items()]
    figures = [
        ["NF4 layers / decoder linear layers", f"{r['nf4_layers']} / {r['linear_layers']}"],
        ["storage vs " + r["compute_dtype"], f"{r['storage_ratio']:.3f}"],
        [
            "dequantization error (mean, max)",
            f"{r['dequant_error_mean']:.3f}, {r['dequant_error_max']:.3f}",
        ],
        [
            "held-out perplexity: unquantized, NF4",
            f"{r['ppl_unquantized']:.2f}, {r['ppl_nf4']:.2f}",
        ],
        ["LoRA steps: loss, tokens/s", f"{r['train_loss']:.3f}, {r['train_tokens_per_s']:.0f}"],
        [
            "LoRA steps: peak MB ("
            + ("CUDA allocator" if args.device == "cuda" else "process resident set")
            + ")",
            f"{r['train_peak_mb']:.0f}",
        ],
    ]
    where = machine()
    text = "\n".join(
        [
            f"# bitsandbytes NF4 on {args.device}",
            "",
            f"`python -m bench.cuda_check --device {args.device}"
            + (f' --overrides "{args.overrides}"' if args.overrides else "")
            + f"` on {where}.",
            "",
            table(["figure", "value"], figures),
            "",
            table(["check", "result"], rows),
        ]
    )
    write_md(f"{args.out}.md", text)
    write_json(f"{args.out}.json", {"machine": where, "overrides": args.overrides, **r})
    if not r["passed"]:
        print("bench.cuda_check: a check failed (see the table)", file=sys.stderr)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
