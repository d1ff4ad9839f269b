"""Model loading: de-quantizing the embedded GGUF vs loading the converted safetensors cache.

Prints both timings side by side and their ratio (one run, same machine), and writes
bench/results/model_load.json. The cache is what every ServerApp and ClientApp process loads.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run() -> dict[str, float | str]:
    from transformers import AutoModelForCausalLM

    from fedpeat.config import ModelConfig
    from fedpeat.model import _convert_gguf, find_package_file

    cfg = ModelConfig()
    gguf = find_package_file(cfg.package, cfg.gguf_file)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "converted"
        t0 = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        gguf_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        _convert_gguf(cfg, target, with_model=True)
        convert_s = time.perf_counter() - t0

        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
            loads.append(time.perf_counter() - t0)
        cached_s = min(loads)
    return {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "gguf_load_s": round(gguf_s, 3),
        "convert_once_s": round(convert_s, 3),
        "cached_load_s": round(cached_s, 3),
        "speedup": round(gguf_s / cached_s, 1),
    }


def main() -> None:
    res = run()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_load.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| load path | seconds |\n|---|---|")
    print(f"| GGUF (de-quantize every time) | {res['gguf_load_s']} |")
    print(f"| convert once (GGUF -> safetensors) | {res['convert_once_s']} |")
    print(f"| safetensors cache (best of 3) | {res['cached_load_s']} |")
    print(f"\ncache is {res['speedup']}x faster than loading the GGUF ({res['machine']})")


if __name__ == "__main__":
    main()
