"""The retention tool's YAML: the curve as conf/controller/common.yaml holds it."""

from __future__ import annotations

from fedpeat.cli.retention import curve_yaml


def test_curve_yaml_lists_the_undistilled_levels_highest_first() -> None:
    curve = {
        "model": "smollm2_135m",
        "rows": [
            {
                "full_model": True,
                "level": 1.0,
                "distilled": False,
                "ppl": 115.174,
                "params": 10,
                "bytes": 20,
            },
            {
                "full_model": False,
                "level": 0.5,
                "distilled": False,
                "ppl": 10592.534,
                "params": 8,
                "bytes": 16.0,
                "need_mb": 669.6,
            },
            {
                "full_model": False,
                "level": 0.5,
                "distilled": True,
                "ppl": 50.0,
                "params": 8,
                "bytes": 16,
                "need_mb": 669.6,
            },
            {
                "full_model": False,
                "level": 0.75,
                "distilled": False,
                "ppl": 1145.825,
                "params": 9,
                "bytes": 18,
                "need_mb": 841.2,
            },
        ],
    }
    assert curve_yaml(curve).splitlines() == [
        "curve_model: smollm2_135m",
        "ppl_full: 115.17",
        "curve:",
        "  - {keep: 0.75, ppl: 1145.83, bytes: 18, params: 9, need_mb: 841}",
        "  - {keep: 0.5, ppl: 10592.53, bytes: 16, params: 8, need_mb: 670}",
    ]
