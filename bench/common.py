"""What every benchmark shares: where results go, memory readings, the machine's description."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

# FEDPEAT_BENCH_RESULTS redirects every result file (bench/gpu.sh's CPU dry run writes to a
# scratch folder, so the committed figures stay as measured).
RESULTS = Path(
    os.environ.get("FEDPEAT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
MiB = 1024 * 1024


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    """Resident memory of this process now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """VmHWM: this address space's peak resident memory. (ru_maxrss would also count the
    parent's, since Linux carries it across fork and exec.)"""
    return _status_mb("VmHWM")


def reset_peak() -> None:
    """Hand freed heap back to the OS, then reset VmHWM to the current resident size (Linux >=
    4.0), so a later peak is the training step's, not the model load's."""
    from fedpeat.quantization import release_freed_memory

    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")


def cuda_reset_peak() -> None:
    """Reset the CUDA allocator's peak (every visible GPU) to what is allocated now."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def cuda_peak_mb() -> float:
    """The CUDA allocator's peak since the last reset (tensors, not the context or cache)."""
    import torch

    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated()) / MiB


def cuda_mb() -> float:
    """CUDA memory held by tensors now."""
    import torch

    return float(torch.cuda.memory_allocated()) / MiB


def memory_meters(device: Any) -> tuple[Any, Any, Any]:
    """(now, peak, reset) in MiB for a torch device: the process's resident set on a CPU, the
    CUDA allocator's tensors on a GPU (the CUDA context and the allocator's cache not counted)."""
    if device.type == "cuda":
        return cuda_mb, cuda_peak_mb, cuda_reset_peak
    return rss_mb, peak_rss_mb, reset_peak


def machine() -> str:
    """The machine in one line: CPU model, cores, memory, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / MiB
    except OSError:
        mem = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}, torch {torch.__version__}"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_md(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text.rstrip() + "\n")
    print(text)
    return path


# Two-sided 97.5% quantiles of Student's t for 1..9 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the t-based 95% interval of the mean (nan bounds for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T975[min(len(values) - 2, len(T975) - 1)] * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half
