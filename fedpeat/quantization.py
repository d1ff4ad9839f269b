"""Quantization of a device's frozen weights with bitsandbytes, chosen per device by the plan.

  32  the model as it is (float32)
  16  every weight and the compute in bfloat16 (fp16 overflows in training on CPU and lacks fast
      kernels there; bf16 is what CUDA devices use as well)
   8  decoder linear layers as LLM.int8 (`Linear8bitLt`), the rest at the compute dtype
   4  decoder linear layers as NF4 (`Linear4bit`), the rest at the compute dtype (QLoRA)

Embeddings, norms and the LM head stay at the compute dtype, as in QLoRA. The compute dtype of a
quantized model is bfloat16 where the hardware runs it natively (CUDA, or a CPU with AVX512-BF16
or AMX), so activations shrink with the weights; elsewhere bf16 is emulated and several times
slower than fp32, so such devices compute in float32 and are not offered 16-bit plans.
bitsandbytes 0.50 runs 4-bit and int8 on CPU as well as CUDA. LoRA layers wrap the quantized
layers unchanged: the adapter stays float32 and trains on the dequantized forward.
"""

from __future__ import annotations

from pathlib import Path

import torch

_LAYER = ".layers."
TRIM_EVERY_BYTES = 16 * 2**20
"""While weights are replaced one by one, freed memory goes back to the OS every this many
bytes (glibc keeps freed heap until asked)."""


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(bits: int, model_dtype: torch.dtype, bf16: bool) -> torch.dtype:
    """Dtype of the unquantized weights and activations under `bits` (0: unquantized) on a
    device with (`bf16`) or without native bfloat16."""
    if bits == 16 or (bits in (4, 8) and bf16):
        return torch.bfloat16
    return model_dtype


def quantize_frozen(
    model: torch.nn.Module, bits: int, device: torch.device, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Quantize `model` in place for training a LoRA adapter on it; returns it.

    `dtype` is the compute dtype (default: bf16 for 16 bits, else the model's). Call before
    attaching LoRA, with the weights on the CPU; the model ends up on `device`.
    """
    if bits in (0, 32):
        return model.to(device)
    if bits not in (4, 8, 16):
        raise ValueError(f"bits={bits} is not supported; expected one of 4, 8, 16, 32")
    if bits == 16:
        return model.to(device, torch.bfloat16)
    if dtype is not None:
        model.to(dtype)
    import bitsandbytes as bnb  # lazily: it probes CUDA at import

    targets = [
        (parent, child_name, child)
        for name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if isinstance(child, torch.nn.Linear) and _LAYER in f".{name}.{child_name}"
    ]
    freed = 0
    targets.reverse()
    while targets:  # popped, so each full-width weight's last reference goes with its layer
        parent, child_name, linear = targets.pop()
        dtype = linear.weight.dtype
        weight = linear.weight.data.to("cpu")
        layer: torch.nn.Module
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=dtype,
                quant_type="nf4",
                device="meta",
            )
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its
            # inference kernel the first time the layer runs in eval mode without gradients
            # (a device evaluating the adapter it received), and from then on multiplies by
            # it with no backward: the gradient stops at every such layer, and LoRA factors
            # below and beside it stop training. Our layers are trained, so never repack.
            layer.support_avx512bf16_for_cpu = False
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                has_fp16_weights=False,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        # Moving a bnb parameter onto a device is what quantizes it.
        setattr(parent, child_name, layer.to(device))
        freed = count_freed(freed, weight.nbytes)  # so freed full-width weights do not pile up
        del parent, linear, weight, layer
    release_freed_memory()
    return model.to(device)


def release_freed_memory() -> None:
    """Hand the freed full-width weights back to the OS (glibc keeps freed heap otherwise, and a
    device's resident memory would stay at the unquantized size)."""
    import gc

    gc.collect()
    trim_heap()


def count_freed(freed: int, nbytes: int) -> int:
    """Bytes freed since the heap was last trimmed, `nbytes` more: past `TRIM_EVERY_BYTES` the
    heap goes back to the OS and the count restarts (call after dropping the last reference)."""
    freed += nbytes
    if freed < TRIM_EVERY_BYTES:
        return freed
    trim_heap()
    return 0


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc's `malloc_trim`), without a collection:
    cheap enough to call while a model is filled tensor by tensor."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def quantized_linear_count(model: torch.nn.Module) -> dict[str, int]:
    """How many linear layers are 4-bit, int8 or plain (for checks and logs)."""
    counts = {"nf4": 0, "int8": 0, "plain": 0}
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            counts["nf4"] += 1
        elif kind == "Linear8bitLt":
            counts["int8"] += 1
        elif isinstance(module, torch.nn.Linear):
            counts["plain"] += 1
    return counts
