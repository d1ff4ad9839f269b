"""Which format keeps a device's frozen weights small on a CPU: bitsandbytes (NF4, LLM.int8,
what `fedpeat.quantization` uses) against torchao's weight-only int8 and int4, beside the plain
widths. One decoder layer of the model (its seven projections, real weights), per format:

  resident    bytes the layer's weights take (every tensor the format keeps: codes, scales,
              zero points, lookup tables), and that over bf16
  error       relative error of the seven products against fp32 with the original weights
  backward    whether a gradient reaches the inputs (a frozen weight under LoRA needs it)
  fwd+bwd     milliseconds for the seven products forward and back at the config's batch and
              length, and that over the plain weights at the same compute dtype
  import      what importing the library adds to a process that already holds torch and
              transformers, and whether it pulls in torch's compiler (inductor)

The choice per width: the smallest resident bytes among the formats that pass the gradient
(within a few per cent counts as equal), then the fastest. torchao is not a dependency of the
app: `make bench-formats` installs it beside .venv (PEFT imports torchao whenever it is
installed, so inside .venv it would weigh on every device process); without it, its rows say so.

    make bench-formats        # or: python -m bench.weight_formats [--overrides ...] [--reps 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import machine, table, write_json, write_md

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The product each projection's input comes from: the layer's input, or what feeds o/down.
_INPUT = {"o_proj": "attn", "down_proj": "mlp"}


class Layer(torch.nn.Module):
    """One decoder layer's seven projections, named as in the model (`layers.0.<proj>`), so
    `fedpeat.quantization.quantize_frozen` treats them as it treats a device's emulator."""

    def __init__(self, linears: dict[str, torch.nn.Linear]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict(linears)])

    def linear(self, name: str) -> torch.nn.Linear:
        block = self.layers[0]
        assert isinstance(block, torch.nn.ModuleDict)
        return block[name]  # type: ignore[return-value]  # a Linear, or a quantized subclass

    def products(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.linear(p)(inputs[_INPUT.get(p, "hidden")]) for p in PROJECTIONS]


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor `module` keeps, a tensor subclass (torchao) counted by the plain
    tensors inside it; bitsandbytes' state dict already lists its codes and quantization state."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def size(t: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all products together (Frobenius)."""
    num = sum(float((g.float() - w.float()).pow(2).sum()) for g, w in zip(got, want, strict=True))
    den = sum(float(w.float().pow(2).sum()) for w in want)
    return (num / den) ** 0.5


SAME_BYTES = 0.05
"""Formats within this share of the smallest resident size count as equally small (scales and
zero points differ by a few per cent between libraries): speed decides among them."""


def choose(rows: list[dict[str, Any]], bits: int) -> str | None:
    """The format for `bits`: among rows of that width whose gradient reaches the inputs, those
    within SAME_BYTES of the smallest resident size, the fastest; None when no row qualifies."""
    ok = [r for r in rows if r["bits"] == bits and r.get("backward") and "ms" in r]
    if not ok:
        return None
    least = min(r["resident_bytes"] for r in ok)
    small = [r for r in ok if r["resident_bytes"] <= least * (1 + SAME_BYTES)]
    return str(min(small, key=lambda r: r["ms"])["format"])


def _bnb(bits: int) -> Callable[[Layer, torch.dtype], Layer]:
    def build(layer: Layer, dtype: torch.dtype) -> Layer:
        from fedpeat.quantization import quantize_frozen

        return quantize_frozen(layer, bits, torch.device("cpu"), dtype)  # type: ignore[return-value]

    return build


def _torchao(kind: str) -> Callable[[Layer, torch.dtype], Layer]:
    def build(layer: Layer, dtype: torch.dtype) -> Layer:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup

        config = {
            "int8": lambda: Int8WeightOnlyConfig(),
            # The packed int4 layout (tinygemm / the CPU int4 kernels).
            "int4": lambda: Int4WeightOnlyConfig(group_size=64),
            # Any-width weight-only with per-group scales, 4-bit values.
            "intx4": lambda: IntxWeightOnlyConfig(
                # torch's stubs lack its sub-byte dtypes
                weight_dtype=torch.int4,  # type: ignore[attr-defined]
                granularity=PerGroup(64),
            ),
        }[kind]()
        layer.to(dtype)
        quantize_(layer, config)
        return layer

    return build


def _plain(width: torch.dtype) -> Callable[[Layer, torch.dtype], Layer]:
    def build(layer: Layer, dtype: torch.dtype) -> Layer:
        return layer.to(width)

    return build


# name -> (library, bits, builder)
FORMATS: dict[str, tuple[str, int, Callable[[Layer, torch.dtype], Layer]]] = {
    "fp32": ("torch", 32, _plain(torch.float32)),
    "bf16": ("torch", 16, _plain(torch.bfloat16)),
    "bnb-int8 (LLM.int8)": ("bitsandbytes", 8, _bnb(8)),
    "bnb-nf4": ("bitsandbytes", 4, _bnb(4)),
    "torchao-int8-weight-only": ("torchao", 8, _torchao("int8")),
    "torchao-int4-weight-only": ("torchao", 4, _torchao("int4")),
    "torchao-intx-int4": ("torchao", 4, _torchao("intx4")),
}


def import_cost(module: str) -> dict[str, Any]:
    """RSS a fresh process gains importing `module` after torch and transformers."""
    code = (
        "import json, sys\n"
        "from bench.common import rss_mb\n"
        "import torch, transformers\n"
        "before = rss_mb()\n"
        "had = 'torch._inductor' in sys.modules\n"
        f"import {module}\n"
        "print(json.dumps({'mb': rss_mb() - before,\n"
        "                  'inductor': not had and 'torch._inductor' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _time(layer: Layer, inputs: dict[str, torch.Tensor]) -> float:
    for x in inputs.values():
        x.grad = None
    began = time.perf_counter()
    sum(p.float().sum() for p in layer.products(inputs)).backward()  # type: ignore[union-attr]
    return (time.perf_counter() - began) * 1000


def measure(overrides: str, reps: int) -> dict[str, Any]:
    from fedpeat.config import compose
    from fedpeat.model import load_model
    from fedpeat.quantization import compute_dtype, fast_bf16

    cfg = compose(overrides)
    model = load_model(cfg.model)
    block = model.model.layers[len(model.model.layers) // 2]
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    linears = {p: getattr(block.self_attn if p in attention else block.mlp, p) for p in PROJECTIONS}
    source = Layer({p: copy.deepcopy(m).float() for p, m in linears.items()})
    del model, block, linears
    bf16 = fast_bf16(torch.device("cpu"))
    shape = (cfg.train.batch_size, cfg.data.max_length)
    torch.manual_seed(0)
    hidden, attn, inner = (source.linear(p).in_features for p in ("q_proj", "o_proj", "down_proj"))
    base = {"hidden": torch.randn(*shape, hidden), "attn": torch.randn(*shape, attn)}
    base["mlp"] = torch.randn(*shape, inner)
    with torch.no_grad():
        want = source.products(base)
    rows: list[dict[str, Any]] = []
    built: dict[str, tuple[Layer, dict[str, torch.Tensor]]] = {}
    for name, (library, bits, build) in FORMATS.items():
        dtype = compute_dtype(bits, torch.float32, bf16) if bits in (4, 8) else torch.float32
        row: dict[str, Any] = {"format": name, "library": library, "bits": bits}
        try:
            layer = build(copy.deepcopy(source), dtype)
        except Exception as err:  # a format this machine cannot build is a row, not a failure
            rows.append({**row, "error": f"{type(err).__name__}: {err}"[:160]})
            continue
        layer.requires_grad_(False)
        run_dtype = torch.bfloat16 if bits == 16 else dtype
        inputs = {k: v.to(run_dtype).clone().requires_grad_(True) for k, v in base.items()}
        with torch.no_grad():
            got = layer.products(inputs)
        row |= {
            "dtype": str(run_dtype).removeprefix("torch."),
            "resident_bytes": resident_bytes(layer),
            "error": None,
            "output_error": relative_error(got, want),
        }
        try:
            _time(layer, inputs)
            row["backward"] = all(x.grad is not None for x in inputs.values())
        except Exception as err:  # likewise a format whose backward fails
            row |= {"backward": False, "backward_error": f"{type(err).__name__}: {err}"[:160]}
        rows.append(row)
        if row["backward"]:
            built[name] = (layer, inputs)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(reps):  # round robin, so the machine's drift falls on every format alike
        for name, (layer, inputs) in built.items():
            times[name].append(_time(layer, inputs))
    bf16_bytes = next(r["resident_bytes"] for r in rows if r["format"] == "bf16")
    plain = {"float32": "fp32", "bfloat16": "bf16"}
    for row in rows:
        if row["format"] in times:
            row["ms"] = statistics.median(times[row["format"]])
        if "resident_bytes" in row:
            row["vs_bf16"] = row["resident_bytes"] / bf16_bytes
    for row in rows:
        ref = next((r for r in rows if r["format"] == plain.get(row.get("dtype", ""))), None)
        if "ms" in row and ref is not None and "ms" in ref:
            row["vs_plain"] = row["ms"] / ref["ms"]
    return {
        "machine": machine(),
        "model": cfg.model.name,
        "batch_length": list(shape),
        "bf16_native": bf16,
        "reps": reps,
        "rows": rows,
        "imports": {lib: import_cost(lib) for lib in ("bitsandbytes", "torchao")},
        "chosen": {bits: choose(rows, bits) for bits in (4, 8)},
    }


def markdown(res: dict[str, Any]) -> str:
    out = [
        "# Weight formats for a device's frozen weights on a CPU",
        "",
        f"`python -m bench.weight_formats` on {res['machine']}: one decoder layer of "
        f"{res['model']} (its seven projections), batch x length {res['batch_length']}, "
        f"median of {res['reps']} forward+backward passes, formats interleaved. Compute dtype: "
        f"what a device uses ({'bf16' if res['bf16_native'] else 'fp32'} for 4 and 8 bits on "
        "this CPU).",
        "",
    ]
    body = []
    for r in res["rows"]:
        if "resident_bytes" not in r:
            body.append([r["format"], r["bits"], "-", "-", "-", "-", "-", "-", r["error"]])
            continue
        body.append(
            [
                r["format"],
                r["bits"],
                r["dtype"],
                f"{r['resident_bytes'] / 2**20:.2f}",
                f"{r['vs_bf16']:.3f}",
                f"{r['output_error']:.4f}",
                "yes" if r["backward"] else f"no ({r.get('backward_error', '')})",
                f"{r['ms']:.1f}" if "ms" in r else "-",
                f"{r['vs_plain']:.2f}" if "vs_plain" in r else "-",
            ]
        )
    header = ["format", "bits", "compute", "resident MiB", "vs bf16", "output error"]
    out.append(table([*header, "gradient to inputs", "fwd+bwd ms", "vs plain"], body))
    out.append("")
    for lib, cost in res["imports"].items():
        if "error" in cost:
            out.append(f"- import {lib}: not available here ({cost['error']})")
        else:
            brings = ", loading torch's inductor" if cost["inductor"] else ""
            out.append(f"- import {lib}: +{cost['mb']:.0f} MB over torch and transformers{brings}")
    for bits, name in res["chosen"].items():
        out.append(f"- {bits} bits: {name or 'no format passes the gradient'}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--overrides", default="", help="Hydra overrides (the model, batch)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    res = measure(args.overrides, args.reps)
    write_json("weight_formats.json", res)
    write_md("weight_formats.md", markdown(res))


if __name__ == "__main__":
    main()
