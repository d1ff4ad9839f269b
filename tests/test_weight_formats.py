"""bench.weight_formats: its rule and measures by hand, and a small run on the tiny model."""

from __future__ import annotations

import pytest
import torch

from bench import weight_formats as wf


def _row(name: str, bits: int, nbytes: int, ms: float, backward: bool = True) -> dict:
    return {"format": name, "bits": bits, "resident_bytes": nbytes, "ms": ms, "backward": backward}


def test_choose_by_hand() -> None:
    rows = [
        _row("small-slow", 4, 100, 10.0),
        _row("same-fast", 4, 104, 5.0),  # within 5% of 100: as small, and faster
        _row("big-fastest", 4, 120, 1.0),  # 20% larger: not a candidate however fast
        _row("no-gradient", 4, 50, 0.5, backward=False),
        _row("other-width", 8, 10, 0.1),
    ]
    assert wf.choose(rows, 4) == "same-fast"
    rows[1]["resident_bytes"] = 106  # 6% over: now the smallest wins
    assert wf.choose(rows, 4) == "small-slow"
    assert wf.choose(rows, 16) is None
    assert wf.choose([{"format": "failed", "bits": 8, "error": "x"}], 8) is None


def test_relative_error_and_resident_bytes_by_hand() -> None:
    # ||(1,2) - (1,1)|| / ||(1,1)|| = 1 / sqrt(2)
    got, want = [torch.tensor([[1.0, 2.0]])], [torch.tensor([[1.0, 1.0]])]
    assert wf.relative_error(got, want) == pytest.approx(2**-0.5)
    lin = torch.nn.Linear(8, 4)
    assert wf.resident_bytes(lin) == (8 * 4 + 4) * 4
    assert wf.resident_bytes(lin.to(torch.bfloat16)) == (8 * 4 + 4) * 2


def test_nf4_keeps_half_a_byte_a_weight_plus_its_block_scales() -> None:
    from fedpeat.quantization import quantize_frozen

    layer = wf.Layer({p: torch.nn.Linear(128, 64, bias=False) for p in wf.PROJECTIONS})
    quantize_frozen(layer, 4, torch.device("cpu"), torch.float32)
    n = 128 * 64
    # Per projection: 4-bit codes (n/2 bytes); one absmax per 64-value block, itself quantized
    # to a byte (double quantization: n/64 bytes, plus one fp32 scale per 256 of them and their
    # 256-entry fp32 code book); NF4's 16-entry fp32 code book; and bitsandbytes' packed header
    # (a short JSON, under 256 bytes).
    floor = len(wf.PROJECTIONS) * (n // 2 + n // 64 + 4 + 256 * 4 + 16 * 4)
    assert floor <= wf.resident_bytes(layer) <= floor + len(wf.PROJECTIONS) * 256


def test_a_small_run_on_the_tiny_model(monkeypatch) -> None:
    monkeypatch.setattr(wf, "import_cost", lambda module: {"mb": 1.0, "inductor": False})
    res = wf.measure("experiment=tiny", reps=1)
    rows = {r["format"]: r for r in res["rows"]}
    assert set(rows) == set(wf.FORMATS)
    for name in ("fp32", "bf16", "bnb-int8 (LLM.int8)", "bnb-nf4"):
        assert rows[name]["backward"] and rows[name]["ms"] > 0, rows[name]
    assert rows["fp32"]["output_error"] == 0.0 and rows["fp32"]["vs_plain"] == 1.0
    assert rows["bf16"]["vs_bf16"] == 1.0 and rows["fp32"]["vs_bf16"] == 2.0
    assert 0 < rows["bnb-nf4"]["output_error"] < 0.2
    assert rows["bnb-nf4"]["resident_bytes"] < rows["bnb-int8 (LLM.int8)"]["resident_bytes"]
    assert res["chosen"][4] == "bnb-nf4"
    text = wf.markdown(res)
    assert "| bnb-nf4 | 4 |" in text and "- 4 bits: bnb-nf4" in text


def test_import_cost_reports_a_light_module() -> None:
    cost = wf.import_cost("json")
    assert cost["mb"] < 5 and cost["inductor"] is False
